"""``export-onnx``: a merged model (or base + adapter, merged on the way) to ONNX, proven equal to
the torch model by an onnxruntime parity test before it is published.

The model is built in float32 (onnxruntime's CPU provider cannot run bf16; upcasting is exact),
with eager attention and no cache, and exported with the dynamo exporter (TorchScript as the
fallback) with dynamic batch and sequence axes. ``model.onnx`` keeps its weights in one external
data file, ``model.onnx.data``, beside it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from ia3tools.errors import ExportError, Notice, OptionError, require
from ia3tools.formats import open_checkpoint
from ia3tools.formats.adapter import read_config
from ia3tools.formats.config import architecture, read_model_config
from ia3tools.formats.hub import base_of, locate
from ia3tools.formats.sentence import read_sentence_model
from ia3tools.publish import Staging, check_output_path
from ia3tools.reports import Report
from ia3tools.tasks import Task, export_task_names, task_named, task_of_architecture, task_of_peft
from ia3tools.write import ADAPTER_FILES, copy_module_dirs, copy_side_files


@dataclass(frozen=True)
class ExportOptions:
    task: str = "auto"  # auto, or a task name (optimum's or ia3tools' own; see tasks.py)
    opset: int = 18
    atol: float = 1e-4  # the largest absolute parity error accepted
    parity: bool = True
    force: bool = False

    def __post_init__(self):
        if self.task != "auto" and task_named(self.task) is None:
            raise OptionError(f"unknown task {self.task!r}; one of auto, {', '.join(export_task_names())}")


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float | None  # None: not finite (or shapes differ, see note)
    max_rel: float | None  # max_abs / max |torch output|
    note: str | None = None


@dataclass
class Parity:
    outputs: dict[str, ErrorStats]
    atol: float
    passed: bool
    inputs: dict[str, list[int]]  # the shapes fed


@dataclass
class ExportReport(Report):
    command: ClassVar[str] = "export-onnx"
    output: str
    task: str
    exporter: str
    opset: int
    parity: Parity | None
    inputs: list[str] = field(default_factory=list)  # the graph's inputs, in order
    outputs: list[str] = field(default_factory=list)  # its outputs, in order
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds


def export_onnx(model_dir: str | os.PathLike | None, out: str | os.PathLike, options: ExportOptions | None = None,
                adapter: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> ExportReport:
    """Export ``model_dir`` (merged first with ``adapter`` when given) to ``out``. ``model_dir`` is a
    directory, a hub id in the local cache, or None for the base ``adapter`` names. Exactly the
    weights in it are exported: an adapter kept beside them is ignored (named in a warning), and
    nothing is ever fetched over the network. ``log`` receives one line per phase."""
    options, log = options or ExportOptions(), log or (lambda _: None)
    # Imported up front: each is needed, and with onnxruntime loaded before the export, the exported
    # graph (and through it every weight) is released after the export; measured, not pinned down.
    for module in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        require(module, "onnx", "export-onnx")
    out = Path(out)
    if model_dir is None and adapter is None:
        raise OptionError("give a model directory, or an adapter whose base it names")
    located = locate(model_dir) if model_dir is not None else base_of(read_config(Path(adapter)))
    model_dir = located.path
    sentence = read_sentence_model(model_dir)
    weights_dir = sentence.transformer_dir if sentence else model_dir
    open_checkpoint(weights_dir).close()  # strict: refuses an adapter-only directory, special files, ...
    warnings = []
    stray = sorted(n for n in ADAPTER_FILES if os.path.lexists(weights_dir / n))
    if stray and adapter is None:
        warnings.append(Notice("adapter-ignored", f"{weights_dir} also holds {', '.join(stray)}: ignored, the "
                               "weights are exported as they are (pass --adapter to merge an adapter first)",
                               file=str(weights_dir)))
    inputs = [model_dir] + ([Path(adapter)] if adapter else [])
    warnings += check_output_path(out, inputs, options.force)
    timings: dict[str, float] = {}
    with Staging(out, options.force) as staging, Staging(out, scratch=True) as scratch:
        source = weights_dir
        if adapter is not None:
            from ia3tools.commands.merge import MergeOptions, merge

            started = time.perf_counter()
            source = scratch.path / "merged"
            merge(weights_dir, adapter, source, MergeOptions(durable=False))  # temporary: no fsync needed
            timings["merge_s"] = _since(started)
            log(f"merged {adapter} into {weights_dir} in {timings['merge_s']} s")
        task = resolve_task(options.task, source, adapter)
        from ia3tools.exporting.graph import validate_export
        from ia3tools.exporting.model import weights_view

        view = weights_view(source, scratch.path / "view")
        report = _export_and_check(view, source, staging.path / "model.onnx", task, options, timings, log, out,
                                   model_dir, sentence)
        copy_side_files(source, staging.path, skip={"README.md"})
        (staging.path / "README.md").write_text(_card(out, located, source, adapter, report))
        if sentence is not None:
            if weights_dir != model_dir:
                copy_side_files(model_dir, staging.path, skip={"README.md"})
            copy_module_dirs(model_dir, staging.path, [d for d in sentence.module_dirs if model_dir / d != weights_dir])
        staging.publish(validate=validate_export)
    report.files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    report.timings = timings
    report.warnings = warnings + staging.notes
    return report


def _card(out: Path, located, source: Path, adapter, report: ExportReport) -> str:
    """The export's model card: the model it was exported from, and how."""
    from ia3tools.card import base_model_id, export_card, read_card_metadata

    source_card = read_card_metadata(source)
    if adapter is not None:
        named = read_config(Path(adapter)).base_model_name_or_path
        base_id, relation = base_model_id(located.hub_id, named, source_card, located.path), "finetune"
    elif source_card.get("base_model") and "ia3tools" in (source_card.get("tags") or []):  # an ia3tools merge
        base_id, relation = source_card["base_model"], source_card.get("base_model_relation")
    else:
        base_id, relation = base_model_id(located.hub_id, None, source_card, located.path), None
    parity = "not checked" if report.parity is None else ", ".join(
        f"{name} max abs error {_num(e.max_abs)}" for name, e in report.parity.outputs.items())
    import shlex

    args = [str(located.hub_id or located.path), *(["--adapter", str(adapter)] if adapter else []),
            "-o", str(out), "--task", report.task]
    command = "ia3tools export-onnx " + shlex.join(args)
    return export_card(name=out.name, base_id=base_id, relation=relation, task=report.task,
                       inputs=report.inputs, outputs=report.outputs, parity=parity, command=command)


def resolve_task(name: str, model_dir: Path, adapter) -> Task:
    """The task named, or for ``auto`` the one config.json's architecture is for, else the adapter's."""
    if name != "auto":
        task = task_named(name)
        if task is None:
            raise OptionError(f"unknown task {name!r}; one of {', '.join(export_task_names())}")
        return task
    arch = architecture(read_model_config(model_dir))
    task = task_of_architecture(arch) if arch else None
    if task is None and adapter is not None:
        task = task_of_peft(read_config(Path(adapter)).task_type)
    if task is None or task.name == "question-answering":
        raise ExportError(f"cannot tell the task (architectures: {arch or 'none'}); pass --task", path=model_dir)
    return task


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _signature(model, task: Task, view: Path, sentence, shown: Path):
    """The graph's inputs (as the tokenizer gives them) and outputs (``sentence_embedding`` too for
    a sentence-transformers model exported for feature extraction)."""
    from ia3tools.exporting.graph import Signature
    from ia3tools.exporting.model import text_input_names

    if task.inputs == "image":
        return Signature(["pixel_values"], [task.output]), "the architecture"
    names, origin = text_input_names(model, view)
    if task.inputs == "seq2seq":
        names.append("decoder_input_ids")
    if sentence is None or task.name != "feature-extraction" or sentence.pooling is None:
        return Signature(names, [task.output]), origin
    other = [m for m in sentence.modules[1:] if m.kind not in ("Pooling", "Normalize")]
    if other:
        raise ExportError(f"sentence-transformers module {other[0].path or other[0].name} ({other[0].kind}) cannot "
                          "be exported: only Pooling and Normalize follow the Transformer", path=shown / "modules.json")
    if "attention_mask" not in names:
        raise ExportError("pooling needs the attention mask, which this model's inputs lack", path=shown)
    return Signature(names, [task.output, "sentence_embedding"], sentence.pooling, sentence.normalize), origin


def _export_and_check(view: Path, source: Path, onnx_path: Path, task: Task, options: ExportOptions, timings, log,
                      out: Path, shown: Path, sentence) -> ExportReport:
    """Load, export, save into ``onnx_path`` (in staging) and prove it, timing and logging each
    phase; errors name ``out``, the path the user gave, or ``shown``, the model directory."""
    import torch

    from ia3tools.exporting.graph import example_inputs, export_graph, release_exporter_state, wrap, write_model
    from ia3tools.exporting.model import load_model
    from ia3tools.exporting.parity import compare, run_onnx

    started = time.perf_counter()
    model = load_model(view, source, task, shown)
    signature, origin = _signature(model, task, view, sentence, shown)
    wrapper = wrap(model, signature)
    # batch >= 2 and length >= 2, or the exporter fixes the axis to the example's size
    export_in, _ = example_inputs(model, signature, 2, 8, pad=False, seed=0)
    parity_in, mask = example_inputs(model, signature, 3, 5, pad=True, seed=1)
    with torch.no_grad():
        reference = wrapper(*[parity_in[n] for n in signature.inputs])
    reference = [r.numpy() for r in (reference if isinstance(reference, tuple) else (reference,))]
    timings["load_s"] = _since(started)
    log(f"loaded {task.optimum} in {timings['load_s']} s; inputs {', '.join(signature.inputs)} (from {origin})")
    started = time.perf_counter()
    exporter, program = export_graph(wrapper, signature, export_in, onnx_path, options.opset, log)
    timings["export_s"] = _since(started)
    log(f"exported with the {exporter} exporter (opset {options.opset}) in {timings['export_s']} s")
    if program is not None:
        started = time.perf_counter()
        write_model(program.model, onnx_path)
        del program
        timings["save_s"] = _since(started)
        log(f"saved {onnx_path.name} and its data in {timings['save_s']} s")
    # Free the weights before onnxruntime loads the export: empty every tensor in place, so that no
    # reference the exporter keeps to the model (its rewriters remember the last graph) keeps them.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    del model, wrapper
    release_exporter_state()
    release_freed_memory()
    report = ExportReport(str(out), task.optimum, exporter, options.opset, None, signature.inputs, signature.outputs)
    if options.parity:
        started = time.perf_counter()
        try:
            got = run_onnx(onnx_path, {k: v.numpy() for k, v in parity_in.items()})
        except Exception as exc:  # onnxruntime's errors (Fail, InvalidGraph, ...) share no base class
            hint = "; try --opset 18" if options.opset != 18 else ""
            raise ExportError(f"onnxruntime cannot run the export: {str(exc).strip().splitlines()[0]}{hint}; "
                              "nothing was published", path=out, code="onnxruntime") from None
        errors = {name: ErrorStats(**compare(ref, g, mask)) for name, ref, g in zip(signature.outputs, reference, got)}
        timings["parity_s"] = _since(started)
        worst_name, worst = max(errors.items(), key=lambda kv: float("inf") if kv[1].max_abs is None else kv[1].max_abs)
        passed = all(e.max_abs is not None and e.max_abs <= options.atol for e in errors.values())
        report.parity = Parity(errors, options.atol, passed, {k: list(v.shape) for k, v in parity_in.items()})
        log(f"parity on {report.parity.inputs} in {timings['parity_s']} s: max abs error {_num(worst.max_abs)} "
            f"({worst_name}), atol {options.atol:g}")
        if not passed:
            raise ExportError(f"parity check failed: max abs error {_num(worst.max_abs)} on {worst_name} exceeds "
                              f"--atol {options.atol:g}; nothing was published", path=out, code="parity-failed")
    return report


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the system (glibc keeps freed blocks below its
    mmap threshold, about half of a model's weights, in its heap otherwise)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"
