"""``export-onnx``: a merged model (or base + adapter, merged on the way) to ONNX, proven equal to
the torch model by an onnxruntime parity test before it is published.

The model is built in float32 (onnxruntime's CPU provider cannot run bf16; upcasting is exact),
with eager attention and no cache, and exported with the dynamo exporter (TorchScript as the
fallback) with dynamic batch and sequence axes. ``model.onnx`` keeps its weights in one external
data file, ``model.onnx.data``, beside it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ia3tools.errors import Ia3Error
from ia3tools.formats import open_checkpoint
from ia3tools.formats.config import architecture, read_model_config
from ia3tools.parity import compare, run_onnx
from ia3tools.publish import Staging, check_output_path
from ia3tools.write import ADAPTER_FILES, copy_side_files

# task -> (transformers auto class, output taken, input kind)
TASKS = {
    "causal-lm": ("AutoModelForCausalLM", "logits", "text"),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", "logits", "seq2seq"),
    "sequence-classification": ("AutoModelForSequenceClassification", "logits", "text"),
    "token-classification": ("AutoModelForTokenClassification", "logits", "text"),
    "feature-extraction": ("AutoModel", "last_hidden_state", "text"),
    "image-classification": ("AutoModelForImageClassification", "logits", "image"),
}
_ARCH_SUFFIXES = [("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                  ("ForConditionalGeneration", "seq2seq-lm"), ("ForSeq2SeqLM", "seq2seq-lm"),
                  ("ForSequenceClassification", "sequence-classification"),
                  ("ForTokenClassification", "token-classification"),
                  ("ForImageClassification", "image-classification"), ("Model", "feature-extraction")]
_ADAPTER_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq-lm", "SEQ_CLS": "sequence-classification",
                  "TOKEN_CLS": "token-classification", "FEATURE_EXTRACTION": "feature-extraction"}
DATA_FILE = "model.onnx.data"


class ExportError(Ia3Error):
    """The model could not be exported, or its export failed the parity check."""


@dataclass(frozen=True)
class ExportOptions:
    task: str = "auto"
    opset: int = 18
    atol: float = 1e-4
    parity: bool = True
    force: bool = False


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions(),
                adapter: str | os.PathLike | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Export ``model_dir`` (merged first with ``adapter`` when given) to ``out``; returns the report.
    Exactly the weights in ``model_dir`` are exported: an adapter kept beside them is ignored
    (named in a warning), and nothing is ever fetched over the network."""
    model_dir, out = Path(model_dir), Path(out)
    open_checkpoint(model_dir).close()  # strict: refuses an adapter-only directory, special files, ...
    warnings = []
    stray = sorted(n for n in ADAPTER_FILES if os.path.lexists(model_dir / n))
    if stray and adapter is None:
        warnings.append(f"{model_dir} also holds {', '.join(stray)}: ignored, the weights are exported as they "
                        "are (pass --adapter to merge an adapter first)")
    inputs = [model_dir] + ([Path(adapter)] if adapter else [])
    warnings += check_output_path(out, inputs, options.force)
    timings: dict[str, float] = {}
    with Staging(out, options.force) as staging, Staging(out, scratch=True) as scratch:
        source = model_dir
        if adapter is not None:
            from ia3tools.merge import MergeOptions, merge

            started = time.perf_counter()
            source = scratch.path / "merged"
            merge(model_dir, adapter, source, MergeOptions(durable=False))  # temporary: no fsync needed
            timings["merge_s"] = _since(started)
            log(f"merged {adapter} into {model_dir} in {timings['merge_s']} s")
        task = resolve_task(options.task, source, adapter)
        onnx_path = staging.path / "model.onnx"
        view = _weights_view(source, scratch.path / "view")
        report = _export_and_check(view, onnx_path, task, options, timings, log, out, shown=model_dir)
        copy_side_files(source, staging.path)
        staging.publish(validate=validate_export)
    report.update({
        "output": str(out),
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())},
        "timings": timings,
        "warnings": warnings + staging.notes,
    })
    return report


def _weights_view(source: Path, view: Path) -> Path:
    """A directory of links to ``source``'s files without its adapter files: transformers
    re-applies an adapter it finds beside the weights (and fetches the base an adapter names), so
    it is only ever shown the weights and side files."""
    view.mkdir()
    for entry in sorted(os.listdir(source)):
        src = source / entry
        if entry.startswith(".") or entry in ADAPTER_FILES or not os.path.isfile(src):
            continue
        target = os.path.realpath(src)
        try:
            os.symlink(target, view / entry)
        except OSError:  # no symlinks here (Windows without the privilege): a hard link, else a copy
            try:
                os.link(target, view / entry)
            except OSError:
                shutil.copyfile(target, view / entry)
    return view


def resolve_task(task: str, model_dir: Path, adapter) -> str:
    if task != "auto":
        if task not in TASKS:
            raise ExportError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        return task
    arch = architecture(read_model_config(model_dir))
    for suffix, name in _ARCH_SUFFIXES:
        if arch.endswith(suffix):
            return name
    if adapter is not None:
        from ia3tools.formats.adapter import read_config

        task_type = read_config(Path(adapter)).task_type
        if task_type in _ADAPTER_TASKS:
            return _ADAPTER_TASKS[task_type]
    raise ExportError(f"cannot tell the task (architectures: {arch or 'none'}); pass --task", path=model_dir)


@contextlib.contextmanager
def offline():
    """Forbid every hub access while transformers runs (``local_files_only`` is passed as well)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "1" for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _load(model_dir: Path, task: str, shown: Path):
    with offline():  # before transformers is first imported: huggingface_hub reads these at import
        import torch
        import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cls = getattr(transformers, TASKS[task][0])
    kwargs = {"dtype": torch.float32, "local_files_only": True}
    if TASKS[task][2] != "image":
        kwargs["attn_implementation"] = "eager"  # sdpa breaks the T5 export under dynamo
    try:
        with offline():
            model = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"transformers cannot load it as {TASKS[task][0]}: {str(exc).splitlines()[0]}",
                          path=shown) from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def _wrap(model, output: str, kind: str):
    """The model as a module taking tensors positionally (named as the exported graph's inputs)
    and returning the one output that is exported and compared."""
    import torch

    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), output)

    class Seq2Seq(Text):
        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                      decoder_input_ids=decoder_input_ids), output)

    class Image(Text):
        def forward(self, pixel_values):
            return getattr(self.model(pixel_values=pixel_values), output)

    return {"text": Text, "seq2seq": Seq2Seq, "image": Image}[kind]().eval()


def example_inputs(model, kind: str, batch: int, length: int, decoder_length: int, pad: bool, seed: int):
    """Inputs for export (``pad`` False) and for parity (another shape, one row padded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        c = getattr(model.config, "num_channels", 3)
        size = getattr(model.config, "image_size", 64)
        size = size if isinstance(size, int) else 64
        return {"pixel_values": torch.randn(batch, c, size, size, generator=g)}, None
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if pad:
        mask[1, length - 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, decoder_length), generator=g)
        return inputs, None  # the compared output is over decoder positions, none of them padding
    return inputs, mask.numpy()


def _dynamic(kind: str):
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if kind == "image":
        return {"pixel_values": {0: batch}}, {"pixel_values": {0: "batch"}}
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    if kind == "seq2seq":
        shapes["decoder_input_ids"] = {0: batch, 1: torch.export.Dim("decoder_sequence")}
        axes["decoder_input_ids"] = {0: "batch", 1: "decoder_sequence"}
    axes["output"] = {0: "batch"}
    return shapes, axes


def _export_and_check(source: Path, onnx_path: Path, task: str, options: ExportOptions, timings, log,
                      out: Path, shown: Path) -> dict:
    """Export into ``onnx_path`` (in staging) and prove it; errors name ``out``, the path the user gave."""
    import torch

    _, output, kind = TASKS[task]
    started = time.perf_counter()
    model = _load(source, task, shown)
    wrapper = _wrap(model, output, kind)
    # batch >= 2 and length >= 2, or the exporter fixes the axis to the example's size
    export_in, _ = example_inputs(model, kind, 2, 8, 6, pad=False, seed=0)
    parity_in, mask = example_inputs(model, kind, 3, 5, 4, pad=True, seed=1)
    with torch.no_grad():
        reference = wrapper(*parity_in.values()).numpy()
    exporter = _export(wrapper, export_in, onnx_path, options.opset, kind, log)
    timings["export_s"] = _since(started)
    log(f"exported {task} with the {exporter} exporter (opset {options.opset}) in {timings['export_s']} s")
    del model, wrapper
    gc.collect()  # the torch model is freed before onnxruntime loads the export
    _tidy(onnx_path)
    validate_export(onnx_path.parent)
    report = {"task": task, "exporter": exporter, "opset": options.opset, "parity": None}
    if options.parity:
        started = time.perf_counter()
        try:
            got = run_onnx(onnx_path, {k: v.numpy() for k, v in parity_in.items()})
        except Exception as exc:  # onnxruntime's errors (Fail, InvalidGraph, ...) share no base class
            hint = "; try --opset 18" if options.opset != 18 else ""
            raise ExportError(f"onnxruntime cannot run the export: {str(exc).strip().splitlines()[0]}{hint}; "
                              "nothing was published", path=out) from None
        errors = compare(reference, got, mask)
        timings["parity_s"] = _since(started)
        passed = errors["max_abs"] <= options.atol
        report["parity"] = {output: errors, "atol": options.atol, "passed": passed,
                            "inputs": {k: list(v.shape) for k, v in parity_in.items()}}
        log(f"parity on {report['parity']['inputs']}: max abs error {errors['max_abs']:.3g}, "
            f"max rel error {errors['max_rel']:.3g} (atol {options.atol:g})")
        if not passed:
            raise ExportError(f"parity check failed: max abs error {errors['max_abs']:.3g} on {output} exceeds "
                              f"--atol {options.atol:g}; nothing was published", path=out)
    return report


def _export(wrapper, inputs: dict, path: Path, opset: int, kind: str, log) -> str:
    """Export with dynamo; fall back to the TorchScript exporter. torch's own progress lines go to
    stderr, keeping stdout for the report."""
    import torch

    shapes, axes = _dynamic(kind)
    names = list(inputs)
    args = tuple(inputs.values())
    failures = []
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    for exporter in ("dynamo", "torchscript"):
        try:
            with contextlib.redirect_stdout(sys.stderr), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=names,
                                                output_names=["output"], dynamic_shapes=shapes, verbose=False)
                    program.save(str(path), external_data=True)
                else:
                    torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                                      output_names=["output"], dynamic_axes=axes)
            return exporter
        except Exception as exc:  # exporters raise many types; the next one gets its chance
            failures.append(f"{exporter}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
            log(f"{exporter} exporter failed; {'trying the next' if exporter == 'dynamo' else 'giving up'}")
            for leftover in path.parent.glob("model.onnx*"):
                leftover.unlink()
    raise ExportError("export failed: " + "; ".join(failures))


def validate_export(directory: Path) -> None:
    """Re-check a written export before it is published: the graph, and one data file beside it."""
    import onnx

    path = directory / "model.onnx"
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx checker rejects the export: {str(exc).strip().splitlines()[0]}", path=path) from None
    locations = _data_locations(path)
    if locations - {DATA_FILE} or not (directory / DATA_FILE).is_file():
        raise ExportError(f"external data is not the single file {DATA_FILE}: {sorted(locations)}", path=path)


def _data_locations(path: Path) -> set[str]:
    """The external data files the model at ``path`` names (read without loading the weights)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    return {ExternalDataInfo(t).location for t in header.graph.initializer if uses_external_data(t)}


def _tidy(path: Path) -> None:
    """Re-save the export as it is published: all weights in one external data file with a plain
    name beside model.onnx (one file per weight litters the directory; a path would make the export
    unportable or unsafe), and no per-node debug metadata. The exporter records stack traces and
    FX dumps there (about 40% of model.onnx for small models), which can carry local paths and make
    the same model differ from machine to machine."""
    import onnx

    locations = _data_locations(path)
    model = onnx.load(str(path))  # brings in the weights from wherever the exporter put them
    for node in _all_nodes(model):
        del node.metadata_props[:]
    for name in locations:
        (path.parent / name).unlink(missing_ok=True)
    # Tiny tensors (shape constants, axes) stay inline: onnxruntime's shape inference needs them there.
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE)
    os.chmod(path.parent / DATA_FILE, path.stat().st_mode & 0o777)  # onnx creates it 0600


def _all_nodes(model):
    """Every node of the model: the main graph, its subgraphs (If/Loop bodies) and local functions."""
    import onnx

    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    return nodes
