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
from ia3tools.exporting.parity import Parity
from ia3tools.reports import Report
from ia3tools.tasks import Task, export_task_names, task_named, task_of_architecture, task_of_peft
from ia3tools.write import ADAPTER_FILES, copy_module_dirs, copy_side_files


@dataclass(frozen=True)
class ExportOptions:
    task: str = "auto"  # auto, or a task name (optimum's or ia3tools' own; see tasks.py)
    opset: int = 18
    atol: float = 1e-4  # the largest absolute parity error accepted (float32 exports)
    parity: bool = True
    force: bool = False
    with_past: bool = False  # a causal LM with a KV cache, for generation
    dtype: str = "fp32"  # fp32, or fp16 (weights stored in fp16, computed in fp32)
    quantize: str | None = None  # None or "int8" (onnxruntime's dynamic quantization)
    runtime_adapters: tuple[str | os.PathLike, ...] = ()  # IA3 adapters switched per run (fp32, no cache)

    def __post_init__(self):
        if self.task != "auto" and task_named(self.task) is None:
            raise OptionError(f"unknown task {self.task!r}; one of auto, {', '.join(export_task_names())}")
        if self.dtype not in ("fp32", "fp16"):
            raise OptionError(f"dtype {self.dtype!r}: expected fp32 or fp16")
        if self.quantize not in (None, "int8"):
            raise OptionError(f"quantize {self.quantize!r}: expected int8")
        if self.runtime_adapters and (self.with_past or self.dtype != "fp32" or self.quantize):
            raise OptionError("--runtime-adapters exports a float32 graph without a KV cache: it cannot be combined "
                              "with --with-past, --dtype fp16 or --quantize")


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
    with_past: bool = False
    dtype: str = "fp32"
    quantize: str | None = None
    weights_bytes: int = 0  # of model.onnx.data
    float32_weights_bytes: int = 0  # of the float32 weights before conversion
    size_ratio: float = 1.0  # weights_bytes / float32_weights_bytes
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    slots: list[dict] = field(default_factory=list)  # runtime adapter slots: name, length, scales
    runtime_adapters: list = field(default_factory=list)  # runtime.AdapterFile per adapter


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
    if options.runtime_adapters and adapter is not None:
        raise OptionError("--runtime-adapters exports the base itself: it cannot be combined with --adapter")
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
    inputs = [model_dir] + ([Path(adapter)] if adapter else []) + [Path(a) for a in options.runtime_adapters]
    warnings += check_output_path(out, inputs, options.force)
    runtime = _runtime_plan(weights_dir, options)
    timings: dict[str, float] = {}
    with Staging(out, options.force) as staging, Staging(out, scratch=True) as scratch:
        source = weights_dir
        if adapter is not None:
            from ia3tools.commands.merge import MergeOptions, merge

            started = time.perf_counter()
            source = scratch.path / "merged"
            merge(weights_dir, adapter, source, MergeOptions(durable=False))  # temporary: no fsync needed
            timings["merge_s"] = round(time.perf_counter() - started, 2)
            log(f"merged {adapter} into {weights_dir} in {timings['merge_s']} s")
        task = resolve_task(options.task, source, adapter)
        from ia3tools.exporting.graph import DATA_FILE, validate_export
        from ia3tools.exporting.model import weights_view
        from ia3tools.exporting.pipeline import run_export

        view = weights_view(source, scratch.path / "view")
        done = run_export(view, source, staging.path / "model.onnx", scratch.path / "work", task, options, log, out,
                          model_dir, sentence, runtime)
        weights = (staging.path / DATA_FILE).stat().st_size
        report = ExportReport(str(out), task.optimum, done.exporter, options.opset, done.parity, done.inputs,
                              done.outputs, options.with_past, options.dtype, options.quantize, weights,
                              done.float32_weights_bytes, round(weights / max(1, done.float32_weights_bytes), 4))
        timings.update(done.timings)
        if runtime is not None:
            report.slots = [{"name": s.name, "length": s.length, "scales": s.scales} for s in runtime.slots]
            report.runtime_adapters = done.adapter_files
        copy_side_files(source, staging.path, skip={"README.md"})
        (staging.path / "README.md").write_text(_card(out, located, source, adapter, report))
        if sentence is not None:
            if weights_dir != model_dir:
                copy_side_files(model_dir, staging.path, skip={"README.md"})
            copy_module_dirs(model_dir, staging.path, [d for d in sentence.module_dirs if model_dir / d != weights_dir])
        staging.publish(validate=validate_export)
    report.files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    report.timings = timings
    report.warnings = warnings + staging.notes
    return report


def _runtime_plan(weights_dir: Path, options: ExportOptions):
    """The slots and parameters of ``--runtime-adapters`` (None without), planned against the base
    as merge plans a fold."""
    if not options.runtime_adapters:
        return None
    from ia3tools.exporting.runtime import RuntimePlan
    from ia3tools.exporting.slots import plan_slots

    base = open_checkpoint(weights_dir)
    try:
        return RuntimePlan(*plan_slots(base, [Path(a) for a in options.runtime_adapters], weights_dir))
    finally:
        base.close()


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
        f"{name} max abs error {'inf' if e.max_abs is None else f'{e.max_abs:.3g}'}" + (
            f", top-1 agreement {e.top1:.1%}" if e.top1 is not None and report.dtype + str(report.quantize) != "fp32None"
            else "") for name, e in report.parity.outputs.items())
    import shlex

    args = [str(located.hub_id or located.path), *(["--adapter", str(adapter)] if adapter else []),
            "-o", str(out), "--task", report.task,
            *(["--runtime-adapters", *(f.source for f in report.runtime_adapters)] if report.runtime_adapters else [])]
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
