"""The ``ia3tools`` command line: options in, one library call, rendering out.

Library failures are ``Ia3Error``s: printed as ``Error: <one line>`` on stderr with exit 1.
Usage errors keep click's exit 2.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import click

from ia3tools import __version__
from ia3tools.blend import METHODS, MISSING
from ia3tools.errors import Ia3Error, Interrupted, printable
from ia3tools.export import TASKS


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(f)


def reports_errors(f):
    """Turn typed library errors into one clean line and their exit code; never a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except Ia3Error as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Interrupted as exc:
            click.echo(f"Error: interrupted ({signal.Signals(exc.signum).name})", err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)

    return wrapper


def emit(report: dict, as_json: bool, render) -> None:
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


def warn(report: dict, as_json: bool) -> None:
    """A report's warnings on stderr (``--json`` carries them in the report instead)."""
    if not as_json:
        for warning in report["warnings"]:
            click.echo(f"warning: {printable(warning)}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ia3tools")
def cli():
    """Inspect, check and merge PEFT IA3 adapters offline, on saved checkpoints."""


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--near-zero", type=float, default=1e-3, show_default=True,
              help="Count adapter entries with |x| below this as near zero.")
@json_option
@reports_errors
def inspect_cmd(path, near_zero, as_json):
    """Show what an adapter directory, checkpoint directory or single weights file holds.

    Reads headers and adapter vectors only, never base weights.
    """
    from ia3tools.inspection import inspect_path
    from ia3tools.render import render_inspect

    emit(inspect_path(path, near_zero=near_zero), as_json, render_inspect)


@cli.command("check")
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@json_option
@reports_errors
def check_cmd(base, adapter, as_json):
    """Check that ADAPTER fits BASE: every vector mapped, shaped and oriented right.

    Exit 0 when it fits, 1 with one line per problem when it does not.
    """
    from ia3tools.check import check
    from ia3tools.render import render_check

    plan, report = check(base, adapter)
    emit(report, as_json, render_check)
    sys.exit(0 if plan.ok else 1)


def _device(ctx, param, value: str) -> str:
    if value in ("cpu", "cuda", "auto") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise click.BadParameter("expected cpu, cuda, cuda:N or auto")


def _dtype(ctx, param, value: str | None) -> str | None:
    from ia3tools.formats.dtypes import FRIENDLY

    if value is None or value == "keep":
        return None
    if value.lower() not in FRIENDLY:
        raise click.BadParameter("expected keep, bf16, fp16 or fp32")
    return FRIENDLY[value.lower()]


def _size(ctx, param, value: str | None) -> int | None:
    from ia3tools.merge import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="Directory to create (required unless --dry-run).")
@click.option("--device", default="cpu", show_default=True, callback=_device,
              help="Where to fold: cpu, cuda, cuda:N or auto (CUDA when available).")
@click.option("--dtype", default=None, callback=_dtype,
              help="Convert floating tensors to bf16, fp16 or fp32 before folding (default: keep).")
@click.option("--max-shard-size", default=None, callback=_size,
              help="Reshard the output, e.g. 2GB (default: keep the base's shard layout).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the output layout; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@click.option("--no-fsync", is_flag=True,
              help="Skip fsync before publishing: as fast as cp, still atomic, but not power-loss safe.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@json_option
@reports_errors
def merge_cmd(base, adapter, out, device, dtype, max_shard_size, dry_run, force, no_fsync, quiet, as_json):
    """Fold ADAPTER's IA3 vectors into BASE and write a standard Hugging Face model directory.

    Bit-identical to PEFT's merge_and_unload; streams tensor by tensor with flat memory; the
    output appears atomically, only once complete and validated.
    """
    from ia3tools.merge import MergeOptions, merge
    from ia3tools.render import render_merge

    if out is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--output' (required unless --dry-run)")
    options = MergeOptions(device=device, dtype=dtype, max_shard_size=max_shard_size, dry_run=dry_run,
                           force=force, progress=not (quiet or as_json), durable=not no_fsync)
    report = merge(base, adapter, out, options)
    warn(report, as_json)
    if as_json or not quiet or dry_run:
        emit(report, as_json, render_merge)


@cli.command("verify")
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@click.argument("merged", type=click.Path())
@json_option
@reports_errors
def verify_cmd(base, adapter, merged, as_json):
    """Prove MERGED is exactly BASE with ADAPTER folded in, bit for bit.

    Exit 0 when identical; 1 naming each differing (with its max error), missing or extra tensor.
    """
    from ia3tools.render import render_verify
    from ia3tools.verify import verify

    report = verify(base, adapter, merged)
    emit(report, as_json, render_verify)
    sys.exit(0 if report["identical"] else 1)


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
@json_option
@reports_errors
def blend_cmd(adapters, weights, out, method, missing, heads_from, force, as_json):
    """Combine IA3 adapters into a new adapter that PEFT loads and `ia3tools merge` accepts.

    Everything is validated before any arithmetic: one weight per adapter, the same
    fan_in_fan_out, the same orientation and length for every shared module, conflicting heads.
    """
    from ia3tools.blend import BlendOptions, blend
    from ia3tools.render import render_blend

    # click options take one value; the rest of `--weights 0.7 0.3` arrives as trailing positionals
    # (negative weights too: unknown options are passed through, and only numbers are accepted).
    adapters, trailing = _split_trailing_numbers(list(adapters))
    for a in adapters:
        if a.startswith("-") and not os.path.exists(a):
            raise click.NoSuchOption(a)
    values = _weights(weights[:1] + tuple(trailing) + weights[1:])
    if len(values) != len(adapters):
        raise click.UsageError(f"{len(adapters)} adapters but {len(values)} weights: give one weight per adapter")
    options = BlendOptions(tuple(values), method, missing, heads_from, force)
    report = blend(list(adapters), out, options)
    warn(report, as_json)
    emit(report, as_json, render_blend)


@cli.command("export-onnx")
@click.argument("model_dir", type=click.Path())
@click.option("--adapter", type=click.Path(),
              help="Merge this IA3 adapter into MODEL_DIR first (in a temporary directory).")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Directory to create.")
@click.option("--task", type=click.Choice(["auto", *TASKS]), default="auto", show_default=True,
              help="Model head to export; auto reads config.json's architectures, then the adapter's task_type.")
@click.option("--opset", type=click.IntRange(14, 23), default=18, show_default=True, help="ONNX opset.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest absolute parity error accepted.")
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime parity check (not recommended).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@json_option
@reports_errors
def export_onnx_cmd(model_dir, adapter, out, task, opset, atol, no_parity, force, as_json):
    """Export a merged model (or MODEL_DIR + --adapter, merged first) to ONNX.

    The export is checked with onnx's checker and proven equal to the torch model by an
    onnxruntime parity test on differently shaped, padded inputs before it is published.
    """
    from ia3tools.export import ExportOptions, export_onnx
    from ia3tools.render import render_export

    options = ExportOptions(task=task, opset=opset, atol=atol, parity=not no_parity, force=force)
    report = export_onnx(model_dir, out, options, adapter=adapter, log=lambda m: click.echo(m, err=True))
    warn(report, as_json)
    emit(report, as_json, render_export)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_trailing_numbers(items: list[str]) -> tuple[list[str], list[str]]:
    """Split positionals into adapter paths and the trailing numbers that are not paths."""
    end = len(items)
    while end > 0 and _is_number(items[end - 1]) and not os.path.exists(items[end - 1]):
        end -= 1
    return items[:end], items[end:]


def _weights(raw: tuple[str, ...]) -> list[float]:
    values = []
    for item in raw:
        for part in item.replace(",", " ").split():
            try:
                values.append(float(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number", param_hint="--weights") from None
    return values


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main() -> None:
    # SIGTERM and SIGHUP (a killed job, a closed terminal) clean up exactly like Ctrl-C.
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupted)
    cli(prog_name="ia3tools")


if __name__ == "__main__":
    main()
