"""Recovering one module's IA3 vector from a base tensor and its merged counterpart, streaming.

An orientation is the weight axis the vector runs along and whether the bias is scaled with it:
outputs (rows of a Linear, columns of GPT-2's transposed Conv1D, output channels; bias scaled) or
inputs (columns of a Linear, rows of a Conv1D, input channels; bias untouched), as
``ia3tools.plan.orientation`` tabulates. ``fit`` tries one orientation: it streams both tensors in
row blocks, intersects each vector element's intervals (``ia3tools.invert``), proves the candidates
by folding the base as merge does, and moves a candidate whose proof fails a float32 step at a
time (``SEARCH`` each way). It returns the vector, or None when no vector in that orientation
reproduces the merged tensor; an empty intersection ends the attempt at the first block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ia3tools.formats.dtypes import DTYPES
from ia3tools.invert import candidates, intervals, reproduces, shifted
from ia3tools.plan import orientation

EXTRACT_BLOCK = 4 << 20  # bytes of each tensor read at a time
PROBE_BLOCK = 256 << 10  # bytes of the first block
SEARCH = 16  # float32 steps tried each way from a candidate whose proof fails


@dataclass(frozen=True)
class Orientation:
    feedforward: bool  # PEFT's name for scaling the inputs
    axis: int  # of the weight the vector runs along
    bias: bool  # whether the bias is scaled along with it
    what: str  # what one element scales: rows, columns, output or input channels


def orientations(layer: str, has_bias: bool) -> tuple[Orientation, Orientation]:
    """(outputs, inputs) for ``layer`` ("linear", "conv1d" or "conv")."""
    return (Orientation(False, *orientation(layer, False)[:1], has_bias, orientation(layer, False)[1]),
            Orientation(True, orientation(layer, True)[0], False, orientation(layer, True)[1]))


class Pair:
    """One tensor's bytes in the base and in the merged checkpoint, read in row blocks."""

    def __init__(self, base, merged, name: str, ref):
        self.base, self.merged, self.name, self.ref = base, merged, name, ref
        self.shape, self.dtype = tuple(ref.shape), ref.dtype

    def blocks(self):
        """(first row, rows, block shape, base bytes, merged bytes) per block. The first block is
        small, so a wrong orientation is found out cheaply (its intervals are already empty)."""
        rows = self.shape[0]
        row = self.ref.nbytes // rows if rows else 0
        lo, per_block = 0, max(1, PROBE_BLOCK // max(row, 1))
        while lo < rows:
            n = min(per_block, rows - lo)
            start, length = lo * row, n * row
            yield (lo, n, (n,) + self.shape[1:], self.base.read_bytes(self.name, start, length),
                   self.merged.read_bytes(self.name, start, length))
            lo, per_block = lo + n, max(1, EXTRACT_BLOCK // max(row, 1))

    def arrays(self):
        """Both sides whole (for a bias: one row of the vector's length)."""
        npd = DTYPES[self.dtype].numpy
        return (np.frombuffer(self.base.read_bytes(self.name), npd),
                np.frombuffer(self.merged.read_bytes(self.name), npd))


def _as2d(raw: bytes, dtype: str, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """A block as 2-D, the vector's axis first (axis 0: rows) or last (axis 1: columns)."""
    a = np.frombuffer(raw, DTYPES[dtype].numpy).reshape(shape)
    if a.ndim == 2:
        return a
    return a.reshape(shape[0], -1) if axis == 0 else np.moveaxis(a, 1, -1).reshape(-1, shape[1])


def _scale(vector: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """The vector shaped to broadcast over a block along ``axis``, as merge multiplies."""
    shape = [1] * ndim
    shape[axis] = len(vector)
    return vector.reshape(shape)


def _per_element(ok: np.ndarray, axis: int) -> np.ndarray:
    """Per vector element, whether every weight element it scales was reproduced."""
    return ok.reshape(ok.shape[0], -1).all(axis=1) if axis == 0 else np.moveaxis(ok, 1, 0).reshape(
        ok.shape[1], -1).all(axis=1)


def _repair(vector: np.ndarray, bad: np.ndarray, check: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> bool:
    """Move each failing element outward a float32 step at a time (+1, -1, +2, ...) until its proof
    holds; ``check(values, which)`` proves the vector elements ``which`` (indices) set to
    ``values``: each element's proof depends on its own value only, so only the failing elements'
    rows or columns are folded again. False when some element found none."""
    which = np.flatnonzero(bad)
    start = vector[which]
    for k in (s * d for s in range(1, SEARCH + 1) for d in (1, -1)):
        if not which.size:
            break
        trial = shifted(start, k)
        fixed = check(trial, which)
        vector[which[fixed]] = trial[fixed]
        which, start = which[~fixed], start[~fixed]
    return not which.size


def _proof(raw_b: bytes, raw_m: bytes, dtype: str, shape: tuple[int, ...], axis: int, values: np.ndarray,
           which: np.ndarray | None) -> np.ndarray:
    """Per vector element ``which`` (None: all), whether folding the base block with ``values`` as
    merge does gives the merged block bit for bit along ``axis``."""
    if which is not None:  # only those rows or columns
        npd = DTYPES[dtype].numpy
        base, merged = (np.take(np.frombuffer(r, npd).reshape(shape), which, axis=axis) for r in (raw_b, raw_m))
        raw_b, raw_m, shape = base.tobytes(), merged.tobytes(), base.shape
    return _per_element(reproduces(raw_b, raw_m, dtype, shape, _scale(values, len(shape), axis)), axis)


def _bias_arrays(weight: Pair, bias: Pair | None, how: Orientation):
    """(base, merged) of the bias when ``how`` scales it; False when it cannot go with the weight."""
    if not how.bias or bias is None:
        return None
    if bias.shape != (weight.shape[how.axis],) or bias.dtype != weight.dtype:
        return False
    return bias.arrays()


def fit(weight: Pair, bias: Pair | None, how: Orientation) -> np.ndarray | None:
    """The float32 vector that re-merges ``weight`` (and ``bias`` when ``how`` scales it) bit for
    bit, or None."""
    b = _bias_arrays(weight, bias, how)
    if b is False:
        return None
    return _fit_rows(weight, b) if how.axis == 0 else _fit_columns(weight, b)


def explained(weight: Pair, bias: Pair | None, how: Orientation) -> np.ndarray:
    """Per vector element, whether the elements it scales agree on some ``l`` (their intervals
    meet): tells a fold with an edited element (nearly all agree) from a retrained module (none
    do). Reads the whole tensor."""
    b = _bias_arrays(weight, bias, how)
    if b is False:
        return np.zeros(weight.shape[how.axis], bool)
    if how.axis == 0:
        return np.concatenate([(low <= high) & ~bad for *_, low, high, bad in _row_bounds(weight, b)])
    low, high, bad = _column_bounds(weight, b, stop_early=False)
    return (low <= high) & ~bad


def _bias_proof(b, dtype: str, lo: int, n: int, values: np.ndarray, which: np.ndarray | None) -> np.ndarray:
    base, merged = b[0][lo:lo + n], b[1][lo:lo + n]
    return _proof(base.tobytes(), merged.tobytes(), dtype, base.shape, 0, values, which)


def _row_bounds(weight: Pair, b):
    """Per block of rows: the block and its rows' intervals (bias included)."""
    dtype = weight.dtype
    if b is not None:  # the bias is one more element of each row
        b_low, b_high, b_impossible = intervals(b[0][:, None], b[1][:, None], dtype, 1)
    for lo, n, shape, raw_b, raw_m in weight.blocks():
        low, high, impossible = intervals(_as2d(raw_b, dtype, shape, 0), _as2d(raw_m, dtype, shape, 0), dtype, 1)
        if b is not None:
            low, high = np.maximum(low, b_low[lo:lo + n]), np.minimum(high, b_high[lo:lo + n])
            impossible |= b_impossible[lo:lo + n]
        yield lo, n, shape, raw_b, raw_m, low, high, impossible


def _column_bounds(weight: Pair, b, stop_early: bool):
    """The columns' intervals over every block (bias included); None as soon as one is empty
    when ``stop_early``."""
    dtype, length = weight.dtype, weight.shape[1]
    low, high, impossible = np.full(length, -np.inf), np.full(length, np.inf), np.zeros(length, bool)
    if b is not None:  # GPT-2's Conv1D: the bias runs along the columns
        low, high, impossible = intervals(b[0][None, :], b[1][None, :], dtype, 0)
    for _, _, shape, raw_b, raw_m in weight.blocks():
        if stop_early and (impossible.any() or (low > high).any()):
            return None
        block_low, block_high, block_bad = intervals(_as2d(raw_b, dtype, shape, 1), _as2d(raw_m, dtype, shape, 1),
                                                     dtype, 0)
        low, high, impossible = np.maximum(low, block_low), np.minimum(high, block_high), impossible | block_bad
    if stop_early and (impossible.any() or (low > high).any()):
        return None
    return low, high, impossible


def _fit_rows(weight: Pair, b) -> np.ndarray | None:
    dtype = weight.dtype
    vector = np.empty(weight.shape[0], np.float32)
    for lo, n, shape, raw_b, raw_m, low, high, impossible in _row_bounds(weight, b):
        if impossible.any() or (low > high).any():
            return None
        part = candidates(low, high)

        def check(v, which, raw_b=raw_b, raw_m=raw_m, shape=shape, lo=lo, n=n):
            ok = _proof(raw_b, raw_m, dtype, shape, 0, v, which)
            return ok & _bias_proof(b, dtype, lo, n, v, which) if b is not None else ok

        if not _repair(part, ~check(part, None), check):
            return None
        vector[lo:lo + n] = part
    return vector


def _fit_columns(weight: Pair, b) -> np.ndarray | None:
    dtype, length = weight.dtype, weight.shape[1]
    bounds = _column_bounds(weight, b, stop_early=True)
    if bounds is None:
        return None
    vector = candidates(bounds[0], bounds[1])

    def check(v, which):
        ok = np.ones(len(v), bool) if b is None else _bias_proof(b, dtype, 0, length, v, which)
        for _, _, shape, raw_b, raw_m in weight.blocks():
            ok &= _proof(raw_b, raw_m, dtype, shape, 1, v, which)
        return ok

    return vector if _repair(vector, ~check(vector, None), check) else None


def nearly_constant(vector: np.ndarray) -> bool:
    """Whether the other orientation might fit too: only a vector whose elements are alike (to
    well past the weight's precision) can scale rows and columns the same way."""
    if vector.size == 0:
        return False
    spread = float(vector.max()) - float(vector.min())
    return spread <= 1e-2 * max(abs(float(vector.mean())), 1e-30)
