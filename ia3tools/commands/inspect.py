"""``inspect``: what an adapter or a checkpoint holds, from headers and vectors only (no weight
data is read, so it answers in well under a second for any checkpoint size)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ia3tools.formats.adapter import CONFIG_NAME, Adapter, read_adapter
from ia3tools.formats.checkpoint import WEIGHT_NAMES, Checkpoint, open_checkpoint
from ia3tools.formats.files import is_dir
from ia3tools.reports import Report, ShardRow

NEAR_ZERO = 1e-3  # |x| below this scales an activation to (almost) nothing
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def group_name(module: str) -> str:
    """Collapse layer indices so that every layer's copy of a module lands in one group."""
    return _LAYER_INDEX.sub(".*", module)


@dataclass(frozen=True)
class Stats:
    """Over the finite entries (None when there are none), and counts of the others."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    near_zero: int
    nan: int
    inf: int


@dataclass(frozen=True)
class VectorGroup(Stats):
    group: str  # module name with layer indices collapsed to *
    vectors: int
    length: int | list[int]
    feedforward: bool
    scales: str  # inputs, outputs or mixed
    dtype: str


@dataclass(frozen=True)
class AdapterSummary:
    peft_type: str
    task_type: str | None
    base_model_name_or_path: str | None
    target_modules: list[str] | str
    feedforward_modules: list[str] | str
    fan_in_fan_out: bool
    modules_to_save: list[str]


@dataclass(frozen=True)
class TensorSummary:
    name: str
    shape: list[int]
    dtype: str


@dataclass
class AdapterInspection(Report):
    command: ClassVar[str] = "inspect"
    kind: str
    path: str
    weights_file: str
    config: AdapterSummary
    vectors: int
    parameters: int
    near_zero_threshold: float
    totals: Stats
    groups: list[VectorGroup]
    heads: list[TensorSummary]
    head_parameters: int


@dataclass(frozen=True)
class DtypeRow:
    dtype: str
    tensors: int
    parameters: int
    bytes: int


@dataclass
class CheckpointInspection(Report):
    command: ClassVar[str] = "inspect"
    kind: str
    path: str
    format: str
    sharded: bool
    tensors: int
    parameters: int
    bytes: int
    dtypes: list[DtypeRow]
    shards: list[ShardRow]
    metadata: dict[str, str] | None


def is_adapter_dir(path: Path) -> bool:
    """A directory is an adapter by its content: a base that also keeps an adapter_config.json
    (some hub repositories do) is still a checkpoint."""
    return is_dir(path) and os.path.lexists(path / CONFIG_NAME) and not any(
        os.path.lexists(path / n) for n in WEIGHT_NAMES)


def inspect(path: str | os.PathLike, *, near_zero: float = NEAR_ZERO) -> AdapterInspection | CheckpointInspection:
    """What the adapter directory, checkpoint directory or weights file at ``path`` holds."""
    path = Path(path)
    with contextlib.ExitStack() as inputs:
        if is_adapter_dir(path):
            return adapter_inspection(inputs.enter_context(contextlib.closing(read_adapter(path))), near_zero)
        return checkpoint_inspection(inputs.enter_context(contextlib.closing(open_checkpoint(path))))


def _stats(values: np.ndarray, near_zero: float, cls=Stats, **extra) -> Stats:
    finite = values[np.isfinite(values)]
    some = finite.size > 0
    return cls(
        mean=float(finite.mean()) if some else None,
        std=float(finite.std()) if some else None,
        min=float(finite.min()) if some else None,
        max=float(finite.max()) if some else None,
        near_zero=int(np.count_nonzero(np.abs(finite) < near_zero)),
        nan=int(np.count_nonzero(np.isnan(values))),
        inf=int(np.count_nonzero(np.isinf(values))),
        **extra,
    )


def adapter_inspection(adapter: Adapter, near_zero: float = NEAR_ZERO) -> AdapterInspection:
    config = adapter.config
    groups: dict[str, list[str]] = defaultdict(list)
    for module in adapter.vectors:
        groups[group_name(module)].append(module)
    rows = []
    for group, modules in groups.items():
        vectors = [adapter.vectors[m] for m in modules]
        lengths = sorted({v.size for v in vectors})
        shapes_ff = {v.shape[0] == 1 and v.ndim == 2 for v in vectors}
        rows.append(_stats(
            np.concatenate([v.ravel() for v in vectors]), near_zero, VectorGroup, group=group, vectors=len(modules),
            length=lengths[0] if len(lengths) == 1 else lengths,
            feedforward=any(config.is_feedforward(m) for m in modules),
            scales="inputs" if shapes_ff == {True} else "outputs" if shapes_ff == {False} else "mixed",
            dtype=",".join(sorted({adapter.vector_dtypes[m] for m in modules}))))
    heads = [TensorSummary(h.name, list(h.shape), h.dtype) for h in adapter.heads.values()]
    values = np.concatenate([v.ravel() for v in adapter.vectors.values()]) if adapter.vectors else np.zeros(0)
    summary = AdapterSummary("IA3", config.task_type, config.base_model_name_or_path, config.target_modules,
                             config.feedforward_modules, config.fan_in_fan_out, config.modules_to_save)
    return AdapterInspection(
        "adapter", str(adapter.path), adapter.weights_path.name, summary, len(adapter.vectors), int(values.size),
        near_zero, _stats(values, near_zero), rows, heads, sum(math.prod(h.shape) for h in heads))


def checkpoint_inspection(ckpt: Checkpoint) -> CheckpointInspection:
    dtypes: dict[str, list[int]] = {}
    for ref in ckpt.tensors.values():
        row = dtypes.setdefault(ref.dtype, [0, 0, 0])
        row[0] += 1
        row[1] += ref.numel
        row[2] += ref.nbytes
    shards = [ShardRow(shard, len(refs), sum(r.nbytes for r in refs)) for shard, refs in ckpt.shard_tensors().items()]
    first = next(iter(ckpt.files.values()))
    return CheckpointInspection(
        "checkpoint", str(ckpt.path), ckpt.format, ckpt.sharded, len(ckpt.tensors),
        sum(r.numel for r in ckpt.tensors.values()), sum(r.nbytes for r in ckpt.tensors.values()),
        sorted((DtypeRow(d, *row) for d, row in dtypes.items()), key=lambda d: -d.bytes), shards, first.metadata,
        warnings=list(ckpt.warnings))
