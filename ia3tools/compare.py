"""Comparing one tensor's bytes on two sides, streaming: equal blocks are compared as bytes and
never decoded; a differing block is decoded to count its differing elements (by bits, so -0 and
+0 differ and NaN equals the same NaN) and, when asked, their largest differences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ia3tools.formats.dtypes import DTYPES

COMPARE_BLOCK = 256 << 10  # bytes of each side read at a time
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_VALUE_CHUNK = 1 << 16  # elements decoded at a time
_EXPONENT = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000}


@dataclass
class Change:
    """How a tensor differs: ``elements`` of ``total`` differ (bytes, for dtypes numpy cannot
    decode); ``max_abs`` and ``max_rel`` over the pairs where both sides are finite (relative to the
    larger magnitude of the pair; 16-bit dtypes computed in float32), None when not measured, not
    numeric or no pair is finite; ``non_finite``: inf or NaN among the second side's differing
    elements."""

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


def _floats(bits: np.ndarray, dtype: str, wide: bool) -> np.ndarray:
    """Bit patterns decoded to float32 (16-bit and smaller dtypes) or float64 (``wide``)."""
    if dtype == "BF16" and not wide:
        return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    return bits.view(DTYPES[dtype].numpy).astype(np.float64 if wide else np.float32)


class _Scratch:
    """Three reused decode buffers of one chunk: fresh block-sized temporaries would cost a page
    fault per page, more than the arithmetic."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.float = np.float32 if DTYPES[dtype].bits <= 16 else np.float64
        self.x, self.y, self.gap = (np.empty(_VALUE_CHUNK, self.float) for _ in range(3))

    def decode(self, bits: np.ndarray, out: np.ndarray) -> np.ndarray:
        out = out[:len(bits)]
        if self.dtype == "BF16":
            np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, bits.view(DTYPES[self.dtype].numpy), casting="unsafe")
        return out


def _largest_slow(x: np.ndarray, y: np.ndarray, dtype: str, change: Change) -> None:
    """One chunk holding inf or NaN, or whose float32 difference overflows: skip non-finite pairs,
    and redo a 16-bit chunk in float64 on overflow."""
    for wide in ((False, True) if DTYPES[dtype].bits <= 16 else (True,)):
        fx, fy = _floats(x, dtype, wide), _floats(y, dtype, wide)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            gap = np.abs(fx - fy)
            if not wide and np.isinf(gap).any():  # inf in the data, or a float32 overflow: redo wide
                continue
            rel = gap / np.maximum(np.abs(fx), np.abs(fy))  # NaN (skipped) for 0/0 and inf/inf
        finite = np.isfinite(gap)
        if finite.any():
            change.max_abs = max(change.max_abs or 0.0, float(np.max(gap, where=finite, initial=0.0)))
            change.max_rel = max(change.max_rel or 0.0, float(np.fmax.reduce(rel, initial=0.0)))
        return


def _largest(ua: np.ndarray, ub: np.ndarray, dtype: str, change: Change, scratch: _Scratch) -> None:
    """The largest absolute and relative differences over the pairs where both sides are finite
    (equal pairs count as 0), in cache-sized chunks decoded into reused buffers; a chunk whose
    differences are not all finite takes the slow path."""
    for lo in range(0, len(ua), _VALUE_CHUNK):
        x, y = ua[lo:lo + _VALUE_CHUNK], ub[lo:lo + _VALUE_CHUNK]
        fx, fy = scratch.decode(x, scratch.x), scratch.decode(y, scratch.y)
        gap = scratch.gap[:len(x)]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            np.subtract(fx, fy, out=gap)
            np.abs(gap, out=gap)
            largest = float(gap.max())
            if not math.isfinite(largest):
                _largest_slow(x, y, dtype, change)
                continue
            np.abs(fx, out=fx)
            np.abs(fy, out=fy)
            np.maximum(fx, fy, out=fx)
            np.divide(gap, fx, out=gap)  # NaN (skipped) for 0/0
        change.max_abs = max(change.max_abs or 0.0, largest)
        change.max_rel = max(change.max_rel or 0.0, float(np.fmax.reduce(gap, initial=0.0)))


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte equality of two equal-length uint8 blocks, eight bytes at a time where they divide."""
    if len(a) % 8 == 0:
        a, b = a.view(np.uint64), b.view(np.uint64)
    return bool(np.array_equal(a, b))


def block_change(a, b, dtype: str, change: Change, values: bool, scratch: _Scratch | None = None) -> None:
    """Add one pair of blocks (buffers of equal lengths) to ``change``."""
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
    if values and numeric:
        _largest(ua, ub, dtype, change, scratch or _Scratch(dtype))


def tensor_change(side_a, side_b, name_a: str, name_b: str, ref, *, values: bool = False) -> Change:
    """Stream tensor ``ref`` (same dtype and shape on both sides; checkpoints with ``read_into``)
    and measure how it differs. Blocks are read into two reused buffers and compared as bytes."""
    change = Change(total=ref.numel if _decodable(ref.dtype) else ref.nbytes)
    size = min(COMPARE_BLOCK, ref.nbytes)
    buf_a, buf_b = np.empty(size, np.uint8), np.empty(size, np.uint8)
    scratch = _Scratch(ref.dtype) if values and _decodable(ref.dtype) else None
    done = 0
    while done < ref.nbytes:
        length = min(size, ref.nbytes - done)
        a, b = buf_a[:length], buf_b[:length]
        side_a.read_into(name_a, a, done)
        side_b.read_into(name_b, b, done)
        if not _equal(a, b):
            block_change(a, b, ref.dtype, change, values, scratch)
        done += length
    if change.max_abs is not None and not math.isfinite(change.max_abs):
        change.max_abs = None
    return change
