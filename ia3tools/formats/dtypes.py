"""The safetensors dtype table: element size, numpy decoding and which dtypes a fold accepts."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # safetensors spelling, e.g. "BF16"
    bits: int  # bits per element (sub-byte types pack several elements per byte)
    numpy: np.dtype | None  # how to decode it; None where numpy cannot (packed sub-byte types)
    foldable: bool  # a floating dtype the fold can compute in float32 and cast back to exactly


def _np(t) -> np.dtype:
    return np.dtype(t)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, _np(np.bool_), False),
        DType("U8", 8, _np(np.uint8), False),
        DType("I8", 8, _np(np.int8), False),
        DType("I16", 16, _np(np.int16), False),
        DType("U16", 16, _np(np.uint16), False),
        DType("I32", 32, _np(np.int32), False),
        DType("U32", 32, _np(np.uint32), False),
        DType("I64", 64, _np(np.int64), False),
        DType("U64", 64, _np(np.uint64), False),
        DType("F16", 16, _np(np.float16), True),
        DType("BF16", 16, _np(ml_dtypes.bfloat16), True),
        DType("F32", 32, _np(np.float32), True),
        DType("F64", 64, _np(np.float64), True),
        DType("C64", 64, _np(np.complex64), False),
        DType("F8_E4M3", 8, _np(ml_dtypes.float8_e4m3fn), False),
        DType("F8_E5M2", 8, _np(ml_dtypes.float8_e5m2), False),
        DType("F8_E8M0", 8, _np(ml_dtypes.float8_e8m0fnu), False),
        DType("F4", 4, None, False),
        DType("F6_E2M3", 6, None, False),
        DType("F6_E3M2", 6, None, False),
    )
}

# Names accepted by `--dtype` and written in reports.
FRIENDLY = {"float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16", "float32": "F32", "fp32": "F32"}

_TORCH_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "bfloat16": "BF16",
    "float32": "F32", "float64": "F64", "complex64": "C64", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
}  # fmt: skip


def from_torch(dtype) -> str | None:
    """The safetensors name of a torch dtype (None when safetensors has no such dtype)."""
    return _TORCH_NAMES.get(str(dtype).removeprefix("torch."))


def to_torch(name: str):
    import torch

    reverse = {v: k for k, v in _TORCH_NAMES.items()}
    return getattr(torch, reverse[name])


def byte_size(name: str, shape) -> int | None:
    """Bytes taken by a tensor of ``name`` and ``shape`` (exact: Python integers), or None when
    sub-byte elements do not fill whole bytes."""
    bits = DTYPES[name].bits
    for d in shape:
        bits *= d
    return bits // 8 if bits % 8 == 0 else None
