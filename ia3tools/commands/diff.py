"""``diff``: what changed between two checkpoints (or two adapters), tensor by tensor, streaming.

Tensors present on both sides with the same dtype and shape are compared as bytes, block by
block; only differing blocks are decoded, to count the differing elements (by bits) and their
largest absolute and relative differences (``ia3tools.compare``). Then the files' metadata
(safetensors ``__metadata__``, all shards together) and the configs (``config.json``, or
``adapter_config.json`` for adapters) are compared key by key.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ia3tools.commands.inspect import is_adapter_dir
from ia3tools.compare import tensor_change
from ia3tools.formats.adapter import CONFIG_NAME as ADAPTER_CONFIG, WEIGHT_NAMES as ADAPTER_WEIGHTS
from ia3tools.formats.checkpoint import Checkpoint, open_checkpoint, open_checkpoint_file
from ia3tools.formats.config import read_model_config
from ia3tools.formats.hub import locate
from ia3tools.formats.jsonstrict import load_json_file
from ia3tools.reports import Report

ABSENT = "<absent>"  # a key on one side only shows the other side as this


@dataclass(frozen=True)
class TensorDifference:
    """``problem``: ``only-in-a``, ``only-in-b``, ``dtype-or-shape`` (``a`` and ``b`` as
    [dtype, shape]) or ``values`` (``elements`` of ``total`` differ; ``max_abs``/``max_rel`` over
    the finite ones, None when the dtype is not numeric or no pair is finite)."""

    tensor: str
    problem: str
    a: list | None = None
    b: list | None = None
    elements: int | None = None
    total: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None


@dataclass(frozen=True)
class KeyDifference:
    """A metadata or config key whose value differs (``ABSENT`` on the side that lacks it)."""

    where: str  # "metadata" or "config"
    key: str
    a: Any
    b: Any


@dataclass
class DiffReport(Report):
    """``ok`` (and exit 0) only when every tensor, metadata entry and config key is the same."""

    command: ClassVar[str] = "diff"
    a: str
    b: str
    identical: int  # tensors equal byte for byte
    differences: list[TensorDifference]
    keys: list[KeyDifference]

    @property
    def ok(self) -> bool:
        return not self.differences and not self.keys


def diff(a: str | os.PathLike, b: str | os.PathLike) -> DiffReport:
    """Compare checkpoints or adapters ``a`` and ``b`` (directories, weights files or hub ids in the
    local cache), streaming."""
    with contextlib.ExitStack() as inputs:
        ca, config_a = _open(a)
        inputs.enter_context(contextlib.closing(ca))
        cb, config_b = _open(b)
        inputs.enter_context(contextlib.closing(cb))
        differences, identical = [], 0
        for name, ref in ca.tensors.items():
            other = cb.tensors.get(name)
            if other is None:
                differences.append(TensorDifference(name, "only-in-a", a=[ref.dtype, list(ref.shape)]))
            elif (other.dtype, other.shape) != (ref.dtype, ref.shape):
                differences.append(TensorDifference(name, "dtype-or-shape", a=[ref.dtype, list(ref.shape)],
                                                    b=[other.dtype, list(other.shape)]))
            else:
                c = tensor_change(ca, cb, name, name, ref, values=True)
                if not c.differs:
                    identical += 1
                else:
                    differences.append(TensorDifference(name, "values", elements=c.elements, total=c.total,
                                                        max_abs=c.max_abs, max_rel=c.max_rel))
        differences += [TensorDifference(n, "only-in-b", b=[r.dtype, list(r.shape)])
                        for n, r in cb.tensors.items() if n not in ca.tensors]
        keys = _keys("metadata", _metadata(ca), _metadata(cb)) + _keys("config", config_a, config_b)
        return DiffReport(os.fspath(a), os.fspath(b), identical, differences, keys)


def _open(spec: str | os.PathLike) -> tuple[Checkpoint, dict]:
    """A checkpoint and its config: an adapter directory's weights and adapter config, or a model's."""
    path = Path(spec)
    if is_adapter_dir(path):
        weights = next((path / n for n in ADAPTER_WEIGHTS if os.path.lexists(path / n)), path / ADAPTER_WEIGHTS[0])
        config = load_json_file(path / ADAPTER_CONFIG, what="adapter config")
        return open_checkpoint_file(weights, root=path), config if isinstance(config, dict) else {"": config}
    ckpt = open_checkpoint(locate(spec, "checkpoint").path)
    try:
        config = read_model_config(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent) or {}
    except BaseException:
        ckpt.close()
        raise
    return ckpt, config


def _metadata(ckpt: Checkpoint) -> dict:
    """Every shard's ``__metadata__`` together; a key whose shards disagree maps to their sorted
    distinct values."""
    seen: dict[str, set] = {}
    for reader in ckpt.files.values():
        for key, value in (getattr(reader, "metadata", None) or {}).items():
            seen.setdefault(key, set()).add(value)
    return {k: next(iter(v)) if len(v) == 1 else sorted(v) for k, v in seen.items()}


def _keys(where: str, a: dict, b: dict) -> list[KeyDifference]:
    def same(x, y):
        return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    out = []
    for key in list(a) + [k for k in b if k not in a]:
        x, y = a.get(key, ABSENT), b.get(key, ABSENT)
        if (key in a) != (key in b) or not same(x, y):
            out.append(KeyDifference(where, key, x, y))
    return out
