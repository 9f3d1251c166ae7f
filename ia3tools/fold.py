"""Pure fold arithmetic, exactly as PEFT's ``merge``: ``weight.float() * vector``, cast once back to
the weight's dtype (round to nearest even), then checked for finiteness after the cast (an fp16
weight times 2 can overflow to inf).

Two interchangeable folders work on raw little-endian bytes, one row block at a time, so memory
stays bounded by the block size whatever the tensor or model size: ``NumpyFolder`` (CPU, never
imports torch) and ``TorchFolder`` (any torch device, e.g. CUDA). Both produce the same bits.
"""

from __future__ import annotations

import numpy as np

from ia3tools.formats.dtypes import DTYPES

BLOCK_BYTES = 16 * 1024 * 1024  # bytes of the source tensor read (and written) per block
CACHE_BYTES = 256 * 1024  # float32 bytes folded at a time within a block, to stay in cache


def compute_dtype(dtype: str) -> str:
    """PEFT multiplies by a float32 vector, so torch promotes to float32 (float64 stays float64)."""
    return "F64" if dtype == "F64" else "F32"


def row_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of one row (one index along axis 0) of a tensor; a scalar is one row."""
    size = itemsize
    for d in shape[1:]:
        size *= d
    return size


def row_blocks(shape: tuple[int, ...], itemsize: int, block_bytes: int | None = None):
    """(first row, row count) blocks along axis 0, each at most ``block_bytes`` (default
    ``BLOCK_BYTES``), at least one row; a tensor with no bytes is one block."""
    block_bytes = block_bytes or BLOCK_BYTES
    rows = shape[0] if shape else 1
    one_row = row_bytes(shape, itemsize)
    if rows == 0 or one_row == 0:  # no bytes at all: one block, however many (empty) rows
        yield 0, rows
        return
    per_block = max(1, block_bytes // one_row)
    for lo in range(0, rows, per_block):
        yield lo, min(per_block, rows - lo)


def block_scale(scale: np.ndarray, lo: int, n: int) -> np.ndarray:
    """The slice of a broadcastable scale that applies to rows ``lo:lo+n``."""
    return scale[lo : lo + n] if scale.shape[0] > 1 else scale


# IEEE 754: a value is inf or NaN exactly when its exponent bits are all ones. Testing that on the
# integer view is several times faster than np.isfinite on ml_dtypes' bfloat16.
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}


def _non_finite(a: np.ndarray, dtype: str) -> int:
    uint, mask = _EXPONENT[dtype]
    bits = a.view(uint) & uint(mask)
    return int(np.count_nonzero(bits == uint(mask)))


def _as_bytes(a: np.ndarray) -> memoryview:
    """The array's bytes without a copy (a flat unsigned-byte view)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


class NonFinite(ValueError):
    """Raised with the count of non-finite values a fold produced."""


class NumpyFolder:
    """Fold on the CPU with numpy (bf16 through ml_dtypes, which rounds like torch)."""

    device = "cpu"

    def decode(self, raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(raw, dtype=DTYPES[dtype].numpy).reshape(shape)

    def fold(self, raw: bytes, dtype: str, shape: tuple[int, ...], scale: np.ndarray | None,
             out_dtype: str | None = None, *, finite: bool = True) -> memoryview:
        """``raw`` (``dtype``, ``shape``) cast to ``out_dtype``, then times ``scale`` in float32 and
        cast back; ``scale`` None only converts. ``finite`` raises ``NonFinite`` when the result
        holds inf or NaN."""
        out_dtype = out_dtype or dtype
        if not len(raw):  # an empty tensor (a zero dimension) folds to nothing
            return memoryview(b"")
        x = self.decode(raw, dtype, shape)
        if out_dtype != dtype:  # from_pretrained(dtype=...) casts before PEFT merges
            x = x.astype(DTYPES[out_dtype].numpy)
        if scale is None:
            return _as_bytes(x)
        compute = DTYPES[compute_dtype(out_dtype)].numpy
        y = np.empty(x.shape, DTYPES[out_dtype].numpy)
        scale = scale.astype(compute, copy=False)
        bad = 0
        # Fold in cache-sized pieces: one pass over memory instead of three (upcast, multiply, cast).
        for lo, n in row_blocks(x.shape, np.dtype(compute).itemsize, CACHE_BYTES):
            wide = x[lo : lo + n].astype(compute)
            with np.errstate(over="ignore", invalid="ignore"):  # counted below, reported by name
                np.multiply(wide, block_scale(scale, lo, n), out=wide)
                np.copyto(y[lo : lo + n], wide, casting="unsafe")  # the one cast, round to nearest even
            if finite:
                bad += _non_finite(y[lo : lo + n], out_dtype)
        if bad:
            raise NonFinite(bad)
        return _as_bytes(y)


class TorchFolder:
    """Fold on a torch device. Same arithmetic as ``NumpyFolder`` (torch's own type promotion is
    what PEFT uses, so on CUDA this is PEFT-on-GPU)."""

    def __init__(self, device: str):
        from ia3tools.errors import Ia3Error, require

        torch = require("torch", "torch", f"--device {device}")

        self.torch = torch
        self.device = device
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise Ia3Error("--device cuda: torch reports no CUDA device")
            index = int(device.partition(":")[2] or 0)
            count = torch.cuda.device_count()
            if index >= count:
                raise Ia3Error(f"--device {device}: torch sees {count} CUDA device(s), numbered 0 to {count - 1}")

    def _dtype(self, name: str):
        from ia3tools.formats.dtypes import to_torch

        return to_torch(name)

    def fold(self, raw: bytes, dtype: str, shape: tuple[int, ...], scale: np.ndarray | None,
             out_dtype: str | None = None) -> bytes:
        torch = self.torch
        out_dtype = out_dtype or dtype
        if not len(raw):  # an empty tensor (torch.frombuffer refuses empty buffers)
            return b""
        x = torch.frombuffer(bytearray(raw), dtype=self._dtype(dtype)).reshape(shape)
        x = x.to(self.device, non_blocking=True).to(self._dtype(out_dtype))
        if scale is not None:
            s = torch.from_numpy(np.ascontiguousarray(scale)).to(self.device, non_blocking=True)
            x = torch.mul(x, s).to(self._dtype(out_dtype))  # promotes to float32 like PEFT
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise NonFinite(bad)
        x = x.cpu()
        if x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
        return x.numpy().tobytes()


def make_folder(device: str):
    """``cpu`` (numpy), ``cuda[:N]`` (torch), or ``auto`` (CUDA when torch sees one, else CPU)."""
    if device == "cpu":
        return NumpyFolder()
    if device == "auto":
        try:
            import torch
        except ImportError:  # the light install: no torch, no GPU to use
            return NumpyFolder()
        return TorchFolder("cuda") if torch.cuda.is_available() else NumpyFolder()
    return TorchFolder(device)
