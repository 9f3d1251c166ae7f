"""``inspect``: what an adapter or a checkpoint holds, from headers and vectors only (no weight
data is read, so it answers in well under a second for any checkpoint size)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ia3tools.formats.adapter import CONFIG_NAME, Adapter, read_adapter
from ia3tools.formats.checkpoint import WEIGHT_NAMES, Checkpoint, open_checkpoint
from ia3tools.formats.files import is_dir

NEAR_ZERO = 1e-3  # |x| below this scales an activation to (almost) nothing
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def group_name(module: str) -> str:
    """Collapse layer indices so that every layer's copy of a module lands in one group."""
    return _LAYER_INDEX.sub(".*", module)


def inspect_path(path: str | os.PathLike, *, near_zero: float = NEAR_ZERO) -> dict:
    path = Path(path)
    # A directory is an adapter by its content: a base that also keeps an adapter_config.json
    # (some hub repositories do) is still a checkpoint.
    if is_dir(path) and os.path.lexists(path / CONFIG_NAME) and not any(
            os.path.lexists(path / n) for n in WEIGHT_NAMES):
        adapter = read_adapter(path)
        try:
            return adapter_report(adapter, near_zero=near_zero)
        finally:
            adapter.close()
    ckpt = open_checkpoint(path)
    try:
        return checkpoint_report(ckpt)
    finally:
        ckpt.close()


def _stats(values: np.ndarray, near_zero: float) -> dict:
    finite = values[np.isfinite(values)]
    stats = {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "near_zero": int(np.count_nonzero(np.abs(finite) < near_zero)),
        "nan": int(np.count_nonzero(np.isnan(values))),
        "inf": int(np.count_nonzero(np.isinf(values))),
    }
    return stats


def adapter_report(adapter: Adapter, *, near_zero: float = NEAR_ZERO) -> dict:
    config = adapter.config
    groups: dict[str, list[str]] = defaultdict(list)
    for module in adapter.vectors:
        groups[group_name(module)].append(module)
    group_rows = []
    for group, modules in groups.items():
        vectors = [adapter.vectors[m] for m in modules]
        lengths = sorted({v.size for v in vectors})
        shapes_ff = {v.shape[0] == 1 and v.ndim == 2 for v in vectors}
        row = {
            "group": group,
            "vectors": len(modules),
            "length": lengths[0] if len(lengths) == 1 else lengths,
            "feedforward": any(config.is_feedforward(m) for m in modules),
            "scales": "inputs" if shapes_ff == {True} else "outputs" if shapes_ff == {False} else "mixed",
            "dtype": ",".join(sorted({adapter.vector_dtypes[m] for m in modules})),
        }
        row.update(_stats(np.concatenate([v.ravel() for v in vectors]), near_zero))
        group_rows.append(row)
    heads = [{"name": h.name, "shape": list(h.shape), "dtype": h.dtype} for h in adapter.heads.values()]
    all_values = np.concatenate([v.ravel() for v in adapter.vectors.values()]) if adapter.vectors else np.zeros(0)
    return {
        "kind": "adapter",
        "path": str(adapter.path),
        "weights_file": adapter.weights_path.name,
        "config": {
            "peft_type": "IA3",
            "task_type": config.task_type,
            "base_model_name_or_path": config.base_model_name_or_path,
            "target_modules": config.target_modules,
            "feedforward_modules": config.feedforward_modules,
            "fan_in_fan_out": config.fan_in_fan_out,
            "modules_to_save": config.modules_to_save,
        },
        "vectors": len(adapter.vectors),
        "parameters": int(all_values.size),
        "near_zero_threshold": near_zero,
        "totals": _stats(all_values, near_zero),
        "groups": group_rows,
        "heads": heads,
        "head_parameters": int(sum(np.prod(h["shape"], dtype=np.int64) for h in heads)),
    }


def checkpoint_report(ckpt: Checkpoint) -> dict:
    dtypes: dict[str, dict] = {}
    for ref in ckpt.tensors.values():
        row = dtypes.setdefault(ref.dtype, {"dtype": ref.dtype, "tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += ref.numel
        row["bytes"] += ref.nbytes
    shards = [
        {"name": shard, "tensors": len(refs), "bytes": sum(r.nbytes for r in refs)}
        for shard, refs in ckpt.shard_tensors().items()
    ]
    first = next(iter(ckpt.files.values()))
    return {
        "kind": "checkpoint",
        "path": str(ckpt.path),
        "format": ckpt.format,
        "sharded": ckpt.sharded,
        "tensors": len(ckpt.tensors),
        "parameters": sum(r.numel for r in ckpt.tensors.values()),
        "bytes": sum(r.nbytes for r in ckpt.tensors.values()),
        "dtypes": sorted(dtypes.values(), key=lambda d: -d["bytes"]),
        "shards": shards,
        "metadata": first.metadata,
        "warnings": ckpt.warnings,
    }
