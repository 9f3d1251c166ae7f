"""Comparing one tensor's bytes on two sides, streaming: equal blocks are compared as bytes and
never decoded; a differing block is decoded to count its differing elements (by bits, so -0 and
+0 differ and NaN equals the same NaN) and, when asked, their largest differences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ia3tools.formats.dtypes import DTYPES

COMPARE_BLOCK = 16 << 20  # bytes of each side read at a time
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_EXPONENT = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000}


@dataclass
class Change:
    """How a tensor differs: ``elements`` of ``total`` differ (bytes, for dtypes numpy cannot
    decode); ``max_abs`` and ``max_rel`` over the differing finite pairs (relative to the larger
    magnitude of the pair), None when not measured or not numeric; ``non_finite``: inf or NaN among
    the second side's differing elements."""

    elements: int = 0
    total: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    non_finite: int = 0

    @property
    def differs(self) -> bool:
        return self.elements > 0

    @property
    def fraction(self) -> float:
        return self.elements / self.total if self.total else 0.0


def _decodable(dtype: str) -> bool:
    d = DTYPES[dtype]
    return d.numpy is not None and d.bits % 8 == 0 and d.bits // 8 in _UINT


def block_change(a: bytes, b: bytes, dtype: str, change: Change, values: bool) -> None:
    """Add one pair of blocks (equal lengths) to ``change``."""
    if not _decodable(dtype):
        diff = np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)
        change.elements += int(np.count_nonzero(diff))
        return
    uint = _UINT[DTYPES[dtype].bits // 8]
    ua, ub = np.frombuffer(a, uint), np.frombuffer(b, uint)
    neq = ua != ub
    count = int(np.count_nonzero(neq))
    change.elements += count
    if not count:
        return
    if dtype in _EXPONENT:
        mask = uint(_EXPONENT[dtype])
        change.non_finite += int(np.count_nonzero(neq & ((ub & mask) == mask)))
    numeric = dtype.startswith(("F", "BF")) or DTYPES[dtype].numpy.kind in "iub"  # ml_dtypes floats are kind V
    if not values or not numeric:
        return
    npd = DTYPES[dtype].numpy
    where = np.flatnonzero(neq)
    x = ua[where].view(npd).astype(np.float64)
    y = ub[where].view(npd).astype(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        return
    x, y = x[finite], y[finite]
    gap = np.abs(x - y)
    scale = np.maximum(np.abs(x), np.abs(y))
    rel = np.divide(gap, scale, out=np.zeros_like(gap), where=scale > 0)
    change.max_abs = max(change.max_abs or 0.0, float(gap.max()))
    change.max_rel = max(change.max_rel or 0.0, float(rel.max()))


def tensor_change(side_a, side_b, name_a: str, name_b: str, ref, *, values: bool = False,
                  stop_at_first: bool = False) -> Change:
    """Stream tensor ``ref`` (same dtype and shape on both sides; readers with ``read_bytes``) and
    measure how it differs. ``stop_at_first`` returns as soon as one block differs (the counts
    then cover the blocks read so far)."""
    change = Change(total=ref.numel if _decodable(ref.dtype) else ref.nbytes)
    done = 0
    while done < ref.nbytes:
        length = min(COMPARE_BLOCK, ref.nbytes - done)
        a = side_a.read_bytes(name_a, done, length)
        b = side_b.read_bytes(name_b, done, length)
        if a != b:
            block_change(a, b, ref.dtype, change, values)
            if stop_at_first:
                break
        done += length
    if change.max_abs is not None and not math.isfinite(change.max_abs):
        change.max_abs = None
    return change
