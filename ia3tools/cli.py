"""The ``ia3tools`` command line: options in, one call of the Python API (``ia3tools.merge``, ...),
rendering out.

Streams: the result goes to stdout; warnings, progress and errors to stderr. ``--json`` prints the
report's envelope (``report.to_json()``, see docs/schema.json) on stdout, failures included, and
``-q`` leaves out progress and summaries, never results or errors. A failure is one line,
``Error: <file>: <what>``, with exit 1; a misfit (check) or a difference (verify, diff) exits 1 too;
usage errors keep click's exit 2; SIGINT, SIGTERM and SIGHUP exit 128 + the signal.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import click

import ia3tools
from ia3tools import __version__
from ia3tools.cli_values import OneOrMore, parse_device, parse_dtype, parse_size_option, parse_weights, split_trailing_numbers
from ia3tools.commands.blend import METHODS, MISSING
from ia3tools.errors import Ia3Error, Interrupted
from ia3tools.reports import failure_json


def common_options(f):
    """``--json`` and ``-q/--quiet``, the same on every command."""
    f = click.option("-q", "--quiet", is_flag=True, help="No progress and no summary (results and errors stay).")(f)
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")(f)


def runs(name: str, render):
    """Run a command body that returns a report: print its warnings (stderr), its result and
    summary (stdout), or its envelope with ``--json``; a failure is one line on stderr (and the
    failure envelope on stdout with ``--json``); exit 1 when the report is not ok."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, as_json: bool, quiet: bool, **kwargs):
            try:
                report = f(*args, quiet=quiet, **kwargs)
            except Ia3Error as exc:
                _fail(name, exc, as_json, f"Error: {exc}", exc.exit_code)
            except Interrupted as exc:
                _fail(name, exc, as_json, f"Error: interrupted ({signal.Signals(exc.signum).name})", 128 + exc.signum)
            except KeyboardInterrupt as exc:
                _fail(name, exc, as_json, "Error: interrupted", 130)
            for notice in report.warnings:
                click.echo(notice.line(), err=True)
            if as_json:
                click.echo(json.dumps(report.to_json(), indent=2))
            else:
                result, summary = render(report)
                for text in (result, None if quiet else summary):
                    if text:
                        click.echo(text)
            sys.exit(0 if report.ok else 1)

        return wrapper

    return decorate


def _fail(name: str, exc: BaseException, as_json: bool, line: str, code: int):
    if as_json:
        click.echo(json.dumps(failure_json(name, exc), indent=2))
    click.echo(line, err=True)
    sys.exit(code)


def _progress(quiet: bool):
    return None if quiet else (lambda message: click.echo(message, err=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ia3tools")
def cli():
    """Inspect, check and merge PEFT IA3 adapters offline, on saved checkpoints."""


def _render(name: str):
    def render(report):
        from ia3tools import render as r

        return getattr(r, f"render_{name}")(report)

    return render


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--near-zero", type=float, default=1e-3, show_default=True,
              help="Count adapter entries with |x| below this as near zero.")
@common_options
@runs("inspect", _render("inspect"))
def inspect_cmd(path, near_zero, quiet):
    """Show what an adapter directory, checkpoint directory or single weights file holds.

    Reads headers and adapter vectors only, never base weights.
    """
    return ia3tools.inspect(path, near_zero=near_zero)


def _optional_base(paths: tuple[str, ...], names: str):
    """``[BASE] ADAPTER ...`` arguments: BASE may be left out when the adapter names its base."""
    wanted = names.split()
    if len(paths) == len(wanted):
        return paths
    if len(paths) == len(wanted) - 1:
        return (None, *paths)
    raise click.UsageError(f"expected {' '.join(['[BASE]'] + wanted[1:])}, got {len(paths)} argument(s)")


@cli.command("check")
@click.argument("paths", nargs=-1, required=True, metavar="[BASE] ADAPTER")
@common_options
@runs("check", _render("check"))
def check_cmd(paths, quiet):
    """Check that ADAPTER fits BASE: every vector mapped, shaped and oriented right.

    BASE is a directory, a hub id org/name[@revision] in the local Hugging Face cache, or left out
    for the base the adapter's base_model_name_or_path names. Exit 0 when it fits, 1 with one line
    per problem when it does not.
    """
    base, adapter = _optional_base(paths, "BASE ADAPTER")
    return ia3tools.check(base, adapter)


@cli.command("merge")
@click.argument("paths", nargs=-1, required=True, metavar="[BASE] ADAPTER")
@click.option("-o", "--output", "out", type=click.Path(), help="Directory to create (required unless --dry-run).")
@click.option("--device", default="cpu", show_default=True, callback=parse_device,
              help="Where to fold: cpu, cuda, cuda:N or auto (CUDA when available).")
@click.option("--dtype", default=None, callback=parse_dtype,
              help="Convert floating tensors to bf16, fp16 or fp32 before folding (default: keep).")
@click.option("--max-shard-size", default=None, callback=parse_size_option,
              help="Reshard the output, e.g. 2GB (default: keep the base's shard layout).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the output layout; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@click.option("--no-fsync", is_flag=True,
              help="Skip fsync before publishing: as fast as cp, still atomic, but not power-loss safe.")
@click.option("--tokenizer-from", type=click.Choice(["base", "adapter"]), default=None,
              help="Whose tokenizer the merged model ships (default: the adapter's when it has one).")
@common_options
@runs("merge", _render("merge"))
def merge_cmd(paths, out, device, dtype, max_shard_size, dry_run, force, no_fsync, tokenizer_from, quiet):
    """Fold ADAPTER's IA3 vectors into BASE and write a standard Hugging Face model directory.

    BASE is a directory, a hub id org/name[@revision] in the local Hugging Face cache, or left out
    for the base the adapter names. Bit-identical to PEFT's merge_and_unload; streams tensor by
    tensor with flat memory; the output appears atomically, only once complete and validated.
    """
    base, adapter = _optional_base(paths, "BASE ADAPTER")
    if out is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--output' (required unless --dry-run)")
    options = ia3tools.MergeOptions(device=device, dtype=dtype, max_shard_size=max_shard_size, dry_run=dry_run,
                                    force=force, progress=not quiet, durable=not no_fsync,
                                    tokenizer_from=tokenizer_from)
    return ia3tools.merge(base, adapter, out, options)


@cli.command("verify")
@click.argument("paths", nargs=-1, required=True, metavar="[BASE] ADAPTER MERGED")
@common_options
@runs("verify", _render("verify"))
def verify_cmd(paths, quiet):
    """Prove MERGED is exactly BASE with ADAPTER folded in, bit for bit.

    BASE may be a hub id in the local cache, or left out for the base the adapter names. Exit 0
    when identical; 1 naming each differing (with its max error), missing or extra tensor.
    """
    base, adapter, merged = _optional_base(paths, "BASE ADAPTER MERGED")
    return ia3tools.verify(base, adapter, merged)


@cli.command("blend", context_settings={"ignore_unknown_options": True})
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", "-w", required=True, multiple=True,
              help="One weight per adapter, in order: --weights 0.7 0.3 (or 0.7,0.3).")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Adapter directory to create.")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True,
              help="linear: sum of w*l; geometric: product of l**w (needs positive entries).")
@click.option("--missing", type=click.Choice(MISSING), default="identity", show_default=True,
              help="A module some adapters lack: they contribute ones (identity) or nothing (zero, PEFT's way).")
@click.option("--heads-from", default=None, help="Adapter whose modules_to_save heads win where several have one.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@common_options
@runs("blend", _render("blend"))
def blend_cmd(adapters, weights, out, method, missing, heads_from, force, quiet):
    """Combine IA3 adapters into a new adapter that PEFT loads and `ia3tools merge` accepts.

    Everything is validated before any arithmetic: one weight per adapter, the same
    fan_in_fan_out, the same orientation and length for every shared module, conflicting heads.
    """
    # click options take one value; the rest of `--weights 0.7 0.3` arrives as trailing positionals
    # (negative weights too: unknown options are passed through, and only numbers are accepted).
    adapters, trailing = split_trailing_numbers(list(adapters))
    for a in adapters:
        if a.startswith("-") and not os.path.exists(a):
            raise click.NoSuchOption(a)
    values = parse_weights(weights[:1] + tuple(trailing) + weights[1:])
    if len(values) != len(adapters):
        raise click.UsageError(f"{len(adapters)} adapters but {len(values)} weights: give one weight per adapter")
    options = ia3tools.BlendOptions(tuple(values), method, missing, heads_from, force)
    return ia3tools.blend(list(adapters), out, options)


@cli.command("extract")
@click.argument("base")
@click.argument("merged")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Adapter directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@common_options
@runs("extract", _render("extract"))
def extract_cmd(base, merged, out, force, quiet):
    """Recover the IA3 adapter that turns BASE into MERGED, exactly.

    `ia3tools merge BASE ADAPTER` then reproduces MERGED's tensors bit for bit. Orientation and
    layout are read from the data; a change no IA3 fold explains is refused, naming the tensor.
    BASE and MERGED may be hub ids in the local cache.
    """
    return ia3tools.extract(base, merged, out, ia3tools.ExtractOptions(force=force))


@cli.command("diff")
@click.argument("a")
@click.argument("b")
@common_options
@runs("diff", _render("diff"))
def diff_cmd(a, b, quiet):
    """Show what differs between checkpoints (or adapters) A and B, tensor by tensor.

    Streams both; identical tensors are compared as bytes. Lists one-sided tensors, dtype or
    shape changes, changed tensors (differing elements, max abs and rel difference), and metadata
    and config keys that differ. Exit 0 when identical, 1 when not.
    """
    return ia3tools.diff(a, b)


def _task_names() -> list[str]:
    from ia3tools.tasks import export_task_names

    return ["auto", *export_task_names()]


@cli.command("export-onnx")
@click.argument("model_dir", required=False)
@click.option("--adapter", type=click.Path(), help="Merge this IA3 adapter into MODEL_DIR first (in a temporary directory).")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Directory to create.")
@click.option("--task", type=click.Choice(_task_names()), default="auto", show_default=True,
              help="Model head to export (optimum's task names; ia3tools' older names are aliases); auto reads "
                   "config.json's architectures, then the adapter's task_type.")
@click.option("--opset", type=click.IntRange(14, 23), default=18, show_default=True, help="ONNX opset.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest absolute parity error accepted.")
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime parity check (not recommended).")
@click.option("--with-past", is_flag=True,
              help="A text-generation graph with a KV cache (past_key_values in, present out), for generation.")
@click.option("--dtype", "export_dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: weights stored in float16 (half the bytes), computed in float32.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="int8: onnxruntime's dynamic quantization of every weight matrix and embedding.")
@click.option("--runtime-adapters", "runtime_adapters", cls=OneOrMore, multiple=True, type=click.Path(),
              metavar="ADAPTER [ADAPTER ...]",
              help="Export MODEL_DIR once with a slot per module these IA3 adapters target, and write each as "
                   "OUT/adapters/<name>.onnx_adapter, switched per run in onnxruntime (give MODEL_DIR first).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@common_options
@runs("export-onnx", _render("export"))
def export_onnx_cmd(model_dir, adapter, out, task, opset, atol, no_parity, with_past, export_dtype, quantize,
                    runtime_adapters, force, quiet):
    """Export a merged model (or MODEL_DIR + --adapter, merged first) to ONNX.

    MODEL_DIR may be a hub id in the local cache, or left out with --adapter for the base the
    adapter names. The export is checked with onnx's checker and proven equal to the torch model by an
    onnxruntime parity test on differently shaped, padded inputs before it is published.
    """
    if model_dir is None and adapter is None:
        raise click.UsageError("missing argument MODEL_DIR (it may be left out only with --adapter)")
    options = ia3tools.ExportOptions(task=task, opset=opset, atol=atol, parity=not no_parity, force=force,
                                     with_past=with_past, dtype=export_dtype, quantize=quantize,
                                     runtime_adapters=tuple(runtime_adapters))
    return ia3tools.export_onnx(model_dir, out, options, adapter=adapter, log=_progress(quiet))


@cli.command("onnx-adapter")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--for", "export", required=True, type=click.Path(),
              help="The export (made with --runtime-adapters) whose slots the adapters fill.")
@click.option("--force", is_flag=True, help="Replace an adapter file of the same name.")
@common_options
@runs("onnx-adapter", _render("onnx_adapter"))
def onnx_adapter_cmd(adapters, export, force, quiet):
    """Add IA3 adapters to an ONNX export made with --runtime-adapters.

    Each ADAPTER (a PEFT IA3 adapter directory) is checked against the slots the export records:
    every vector needs a slot of its length, scaling the same side, in the same layout
    (fan_in_fan_out). Written as OUT/adapters/<name>.onnx_adapter after one run in onnxruntime.
    """
    return ia3tools.onnx_adapter(list(adapters), export, ia3tools.OnnxAdapterOptions(force=force))


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main() -> None:
    # SIGTERM and SIGHUP (a killed job, a closed terminal) clean up exactly like Ctrl-C.
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupted)
    # Any console can print any message: what its encoding lacks is written as an escape.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from ia3tools.allocator import tune

    tune()  # block-sized temporaries reused, not mapped and faulted in each time
    cli(prog_name="ia3tools")


if __name__ == "__main__":
    main()
