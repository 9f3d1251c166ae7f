"""Inverting an IA3 fold exactly: given a base tensor and its merged counterpart, the float32
vector that re-merges to the merged tensor bit for bit.

The fold is ``merged = round(float32(w) * l)`` (one float32 multiply, one cast back to the
weight's dtype, round to nearest even). Order floats so that -0 sorts below +0: for a fixed
``w > 0`` that is monotone in ``l`` (decreasing for ``w < 0``), so the ``l`` reproducing one element
form an interval, those whose product lands within half a unit of the merged value. A vector
element scales a whole row (outputs, bias included) or column (inputs); intersecting its elements'
intervals gives the set of ``l`` that reproduce all of them, which holds the true ``l``.

The bounds are the midpoints with the merged values' neighbours (exact: in float32 for 16-bit
weights, float64 for wider ones) divided by the base, and widened by a hair, since the fold rounds
twice (to float32, then to the weight's dtype) and the bounds ignore the first rounding and the
division's. So a candidate is then *proven* by
folding the base exactly as ``merge`` does and comparing bits; one that fails is moved a float32
step at a time (see ``ia3tools.extraction``). Which float is written: 1.0 when the interval holds it
(a module whose fold changed nothing disappears), else 0.0 when it holds that, else the float32
nearest the interval's midpoint that lies inside it.
"""

from __future__ import annotations

import numpy as np

from ia3tools.fold import NumpyFolder
from ia3tools.formats.dtypes import DTYPES

UINT = {"F16": np.uint16, "BF16": np.uint16, "F32": np.uint32, "F64": np.uint64}
# relative widening of each bound: covers the fold's first rounding (to float32) for 16-bit
# weights and the bounds' own rounding for wider ones
_WIDEN = {"F16": 2.0 ** -20, "BF16": 2.0 ** -20, "F32": 2.0 ** -45, "F64": 2.0 ** -50}
_COMPUTE = {"F16": np.float32, "BF16": np.float32, "F32": np.float64, "F64": np.float64}
_EXPONENT = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000}
_HALF_STEP = {"BF16": 0x8000, "F16": 0x1000}  # half a 16-bit step, in float32 bit units
_CHUNK = 1 << 16  # elements worked at a time, so the temporaries stay in cache


def step(bits: np.ndarray, k) -> np.ndarray:
    """Float bit patterns (an unsigned view) moved ``k`` representable values up (k > 0) or down,
    in the order where -0 sorts below +0."""
    uint = bits.dtype.type
    sign = uint(1) << uint(bits.dtype.itemsize * 8 - 1)
    key = np.where(bits & sign, ~bits, bits | sign)  # an order-preserving unsigned key
    key = (key.astype(np.int64) + k).astype(uint) if uint is not np.uint64 else _add64(key, k)
    return np.where(key & sign, key & ~sign, ~key).astype(uint)


def _add64(key: np.ndarray, k) -> np.ndarray:
    k = np.asarray(k, np.int64)
    return np.where(k >= 0, key + np.abs(k).astype(np.uint64), key - np.abs(k).astype(np.uint64))


def shifted(values: np.ndarray, k) -> np.ndarray:
    """float32 ``values`` moved ``k`` float32 steps."""
    return step(np.ascontiguousarray(values, np.float32).view(np.uint32), k).view(np.float32)


def _float32_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit float patterns as float32 patterns, by integer arithmetic: bf16 is float32's top half;
    an fp16 gets its exponent rebased (exact for normal magnitudes only, see ``_f16_off_lattice``)."""
    if dtype == "BF16":
        return np.left_shift(bits, 16, dtype=np.uint32)
    u = bits.astype(np.uint32)
    return ((u & np.uint32(0x8000)) << np.uint32(16)) | (((u & np.uint32(0x7FFF)) + np.uint32(0x1C000))
                                                         << np.uint32(13))


def _f16_off_lattice(wb, mb, magnitude, w_magnitude, nonzero, bigger, smaller, w) -> None:
    """fp16 subnormals and zeros are not rebased normals, and the smallest normal's lower neighbour
    is a subnormal: decode those few exactly (their midpoints are exact in float32). They are
    rare, so they are gathered by index (a boolean mask would cost a pass per use)."""
    at = np.flatnonzero(magnitude <= np.uint16(0x0400))
    if at.size:
        m = mb.reshape(-1)[at]
        value = m.view(np.float16).astype(np.float32)
        up = (value + (m + np.uint16(1)).view(np.float16).astype(np.float32)) * np.float32(0.5)
        down = m - nonzero.reshape(-1)[at].astype(np.uint16)
        bigger.reshape(-1)[at] = up
        smaller.reshape(-1)[at] = (value + down.view(np.float16).astype(np.float32)) * np.float32(0.5)
    at = np.flatnonzero(w_magnitude < np.uint16(0x0400))
    if at.size:
        w.reshape(-1)[at] = wb.reshape(-1)[at].view(np.float16).astype(np.float32)


def _chunk(wb: np.ndarray, mb: np.ndarray, dtype: str, reduce: int):
    """``intervals`` of one cache-sized piece, on the unsigned views of its base and merged bits."""
    uint = UINT[dtype]
    sign = uint(1) << uint(8 * np.dtype(uint).itemsize - 1)
    magnitude, w_magnitude = mb & ~sign, wb & ~sign
    nonzero = magnitude != 0
    if dtype in _HALF_STEP:  # 16-bit floats sit on float32's bit lattice: the midpoints are half-steps
        half = np.uint32(_HALF_STEP[dtype])
        m32 = _float32_bits(mb, dtype)
        bigger = (m32 + half).view(np.float32)
        smaller = (m32 - nonzero.astype(np.uint32) * half).view(np.float32)
        w = _float32_bits(wb, dtype).view(np.float32)
        if dtype == "F16":
            _f16_off_lattice(wb, mb, magnitude, w_magnitude, nonzero, bigger, smaller, w)
    else:  # the midpoints with the neighbours one step up and down in magnitude, exact in float64
        native, compute = DTYPES[dtype].numpy, _COMPUTE[dtype]
        m = mb.view(native).astype(compute)
        half = compute(0.5)
        with np.errstate(over="ignore", invalid="ignore"):
            bigger = (m + (mb + uint(1)).view(native).astype(compute)) * half
            smaller = (m + (mb - nonzero.astype(uint)).view(native).astype(compute)) * half
        w = wb.view(native).astype(compute)
    zero_w = w_magnitude == 0
    np.copyto(w, np.nan, where=zero_w)  # a zero weight constrains nothing (NaN is skipped below)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(bigger, w, out=bigger)
        np.divide(smaller, w, out=smaller)
        low = np.fmax.reduce(np.fmin(bigger, smaller), axis=reduce)
        high = np.fmin.reduce(np.fmax(bigger, smaller, out=smaller), axis=reduce)
    exponent = uint(_EXPONENT[dtype])
    impossible = np.any(((mb & exponent) == exponent) | (zero_w & nonzero), axis=reduce)
    return low, high, impossible


def intervals(base: np.ndarray, merged: np.ndarray, dtype: str, reduce: int):
    """For a 2-D block, the bounds (low, high) of the ``l`` reproducing every element, intersected
    along axis ``reduce`` (1 for a vector along the rows, 0 along the columns) and widened; and
    per vector element whether some element forbids every ``l``: a merged inf or NaN (merge refuses
    to write one), or a zero weight whose merged value is not zero. Worked in cache-sized pieces
    of rows."""
    uint = UINT[dtype]
    wb, mb = base.view(uint), merged.view(uint)
    rows, cols = wb.shape
    step_rows = max(1, _CHUNK // max(cols, 1))
    if reduce == 1:
        low, high, impossible = np.empty(rows), np.empty(rows), np.empty(rows, bool)
        for r in range(0, rows, step_rows):
            piece = slice(r, r + step_rows)
            low[piece], high[piece], impossible[piece] = _chunk(wb[piece], mb[piece], dtype, 1)
    else:
        low, high, impossible = np.full(cols, np.nan), np.full(cols, np.nan), np.zeros(cols, bool)
        for r in range(0, rows, step_rows):
            a, b, bad = _chunk(wb[r:r + step_rows], mb[r:r + step_rows], dtype, 0)
            np.fmax(low, a, out=low)
            np.fmin(high, b, out=high)
            impossible |= bad
    low[np.isnan(low)], high[np.isnan(high)] = -np.inf, np.inf  # every element unconstrained
    widen = _WIDEN[dtype]
    with np.errstate(invalid="ignore", over="ignore"):
        low = np.where(np.isfinite(low), low - np.abs(low) * widen, low)
        high = np.where(np.isfinite(high), high + np.abs(high) * widen, high)
    return low, high, impossible


def candidates(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """1.0 where the interval holds it, else 0.0 where it holds that (an inhibited row or column),
    else the float32 nearest its midpoint, stepped inside the interval where rounding to float32
    left it."""
    with np.errstate(invalid="ignore", over="ignore"):
        middle = np.where(np.isfinite(low) & np.isfinite(high), low / 2 + high / 2,
                          np.where(np.isfinite(low), low, np.where(np.isfinite(high), high, 1.0)))
        c = middle.astype(np.float32)
    c = np.where(c.astype(np.float64) > high, np.nextafter(c, np.float32(-np.inf)), c)
    c = np.where(c.astype(np.float64) < low, np.nextafter(c, np.float32(np.inf)), c)
    c = np.where((low <= 0.0) & (0.0 <= high), np.float32(0.0), c)
    return np.where((low <= 1.0) & (1.0 <= high), np.float32(1.0), c).astype(np.float32)


def reproduces(base_raw: bytes, merged_raw: bytes, dtype: str, shape: tuple[int, ...], scale: np.ndarray) -> np.ndarray:
    """Per element, whether folding ``base_raw`` with ``scale`` (broadcast as merge does) gives the
    merged element bit for bit: the proof uses merge's own fold."""
    folded = NumpyFolder().fold(base_raw, dtype, shape, scale, finite=False)
    uint = UINT[dtype]
    return np.frombuffer(folded, uint).reshape(shape) == np.frombuffer(merged_raw, uint).reshape(shape)
