"""``merge``: fold an adapter into its base checkpoint, tensor by tensor, into a standard Hugging
Face model directory, published atomically.

Tensors no vector touches are copied as raw bytes in the kernel; folded tensors are streamed in
row blocks; so memory stays flat whatever the model or shard size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ia3tools import __version__
from ia3tools.assemble import Assembly, assemble
from ia3tools.check import plan_report
from ia3tools.errors import FormatError, OutputError
from ia3tools.fold import make_folder
from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.formats.config import CONFIG_NAME, architecture, read_model_config
from ia3tools.formats.dtypes import DTYPES
from ia3tools.plan import build_plan
from ia3tools.publish import Staging, check_output_path
from ia3tools.write import OutTensor, copy_side_files, validate_checkpoint, write_index, write_safetensors

# adapter task_type -> the transformers class suffix whose head it trains
TASK_CLASSES = {
    "SEQ_CLS": "ForSequenceClassification",
    "TOKEN_CLS": "ForTokenClassification",
    "QUESTION_ANS": "ForQuestionAnswering",
    "CAUSAL_LM": "ForCausalLM",
    "SEQ_2_SEQ_LM": "ForConditionalGeneration",
}


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"  # "cpu", "cuda[:N]" or "auto"
    dtype: str | None = None  # safetensors dtype for floating tensors; None keeps each tensor's own
    max_shard_size: int | None = None  # bytes; None keeps the base's shard layout
    dry_run: bool = False
    force: bool = False
    progress: bool = False
    durable: bool = True  # fsync before publishing; False trades power-loss safety for cp-like speed


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10GiB' or a plain byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 2GB or 500MB)") from None
    if unit not in units or not math.isfinite(value) or value <= 0 or value * units[unit] < 1:
        raise ValueError(f"not a size: {text!r} (try 2GB or 500MB)")
    return int(value * units[unit])


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike | None,
          options: MergeOptions = MergeOptions()) -> dict:
    """Fold ``adapter`` into ``base`` and write the merged model to ``out``; returns the report.
    ``out`` may be None only for a dry run."""
    started = time.perf_counter()
    base, adapter_path = Path(base), Path(adapter)
    out = Path(out) if out is not None else None
    if out is None and not options.dry_run:
        raise OutputError("no output directory given")
    with contextlib.ExitStack() as inputs:
        ckpt = open_checkpoint(base)
        inputs.callback(ckpt.close)
        ad = read_adapter(adapter_path)
        inputs.callback(ad.close)
        plan = build_plan(ckpt, ad)
        plan.require_fit(adapter_path)
        base_config = read_model_config(ckpt.path) if ckpt.path.is_dir() else None  # strict, even if unused
        notes = check_output_path(out, [base, adapter_path], options.force) if out is not None else []
        folder = make_folder(options.device)
        dtype_for = _dtype_rule(options.dtype)
        assembly = assemble(ckpt, ad, plan, folder, dtype_for)
        layout = _layout(ckpt, assembly, options.max_shard_size)
        config = _retargeted_config(ckpt.path, base_config, ad, plan, assembly)  # checked before writing
        report = {
            "output": str(out) if out is not None else None,
            "base": str(base),
            "adapter": str(adapter_path),
            "adapter_sha256": ad.sha256(),
            "tool": f"ia3tools {__version__}",
            "device": folder.device,
            "dtype": options.dtype or "kept",
            "tensors": len(assembly.all_tensors()),
            "folded": len(assembly.folded),
            "heads_replaced": len(assembly.replaced),
            "heads_added": len(assembly.added),
            "shards": [{"name": n, "tensors": len(ts), "bytes": sum(t.nbytes for t in ts)} for n, ts in layout.items()],
            "bytes": sum(t.nbytes for t in assembly.all_tensors()),
            "dry_run": options.dry_run,
            "warnings": [w.line().removeprefix("warning: ") for w in plan.warnings] + notes,
        }
        if options.dry_run:
            report["plan"] = plan_report(plan, base=base, adapter=adapter_path, vectors=len(ad.vectors))
            return report
        metadata = {
            "format": "pt",
            "ia3tools_version": __version__,
            "ia3tools_adapter_sha256": report["adapter_sha256"],
            "ia3tools_adapter": adapter_path.resolve().name,
        }
        with Staging(out, options.force, durable=options.durable) as staging:
            _write_weights(staging.path, layout, metadata, report["bytes"], options.progress, options.durable)
            if ckpt.path.is_dir():
                copy_side_files(ckpt.path, staging.path)
            if config is not None:
                (staging.path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            staging.publish(validate_checkpoint)
        report["warnings"] += staging.notes
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report


def _dtype_rule(dtype: str | None):
    if dtype is None:
        return lambda ref: ref.dtype
    return lambda ref: dtype if DTYPES[ref.dtype].foldable else ref.dtype


def _layout(ckpt, assembly: Assembly, max_shard_size: int | None) -> dict[str, list[OutTensor]]:
    """Output file name -> tensors. By default the base's shards, renamed to safetensors."""
    if max_shard_size is None:
        groups = list(assembly.shards.values())
    else:
        groups, current, size = [], [], 0
        for t in assembly.all_tensors():
            if current and size + t.nbytes > max_shard_size:
                groups.append(current)
                current, size = [], 0
            current.append(t)
            size += t.nbytes
        groups.append(current)
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    if max_shard_size is None and ckpt.format == "safetensors":
        return dict(zip(assembly.shards, groups))
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_weights(directory: Path, layout, metadata: dict, total: int, progress: bool, durable: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None if progress else True, leave=False)
    with bar:
        for name, tensors in layout.items():
            write_safetensors(directory / name, tensors, metadata, progress=bar.update, durable=durable)
    if len(layout) > 1:
        weight_map = {t.name: name for name, tensors in layout.items() for t in tensors}
        index_meta = {"total_size": total, **metadata}
        write_index(directory / "model.safetensors.index.json", weight_map, index_meta)


def _retargeted_config(base: Path, config: dict | None, adapter, plan, assembly: Assembly) -> dict | None:
    """A bare backbone that gains a task head: config.json must name the task model, so that
    ``AutoModelFor<Task>.from_pretrained`` loads every weight, with label maps sized to the head.
    Returns that config (None when nothing changes); raises before anything is written."""
    if not plan.names.rename_output or config is None:
        return None
    path = base / CONFIG_NAME
    task = adapter.config.task_type
    suffix = TASK_CLASSES.get(task or "")
    if suffix is None:
        raise OutputError(f"the adapter adds head tensors but its task_type {task!r} names no transformers task",
                          path=adapter.config.path)
    arch = architecture(config)
    stem = arch[: -len("Model")] if arch.endswith("Model") else arch
    if not stem:
        raise FormatError("config names no architecture to derive the task model from", path=path)
    config["architectures"] = [stem + suffix]
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        weights = [t for t in assembly.all_tensors() if t.name in assembly.added and len(t.shape) == 2]
        if weights:
            labels = weights[0].shape[0]
            if len(config.get("id2label") or {}) != labels:
                config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
                config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return config
