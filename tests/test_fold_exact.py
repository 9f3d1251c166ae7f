"""The CPU fold (and so merge, verify and extract's proof) against torch's own arithmetic, which is
PEFT's: ``(weight.float() * vector).to(weight.dtype)``. Exhaustive where it is cheap: every bf16
bit pattern and every fp16 one times a set of vectors, every rounding tie to bf16 and to fp16."""

import numpy as np
import pytest
import torch

from ia3tools.fold import CACHE_BYTES, NonFinite, NumpyFolder

# every bf16 pattern, as a 256 x 256 weight: rows are the high byte, columns the low byte
ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
SCALES = [1.0, 0.0, -0.0, 0.5, 2.0, 1.0 + 2.0 ** -9, 1.0 - 2.0 ** -10, 3.14159, -1.7, 1e30, 1e-30, 1e-38, 7e37]


def torch_fold(bits: np.ndarray, dtype, scale: np.ndarray) -> np.ndarray:
    """PEFT's arithmetic, on the bit patterns ``bits`` of ``dtype``; returns the result's bits."""
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    w = torch.from_numpy(bits.astype(bits.dtype.newbyteorder("=")).view(np.int16 if bits.itemsize == 2 else np.int32))
    w = w.view(dtype)
    out = (w.float() * torch.from_numpy(scale.astype(np.float32))).to(dtype)
    return out.view(view).numpy().view(bits.dtype)


def ours(bits: np.ndarray, dtype: str, scale: np.ndarray, finite=False) -> np.ndarray:
    out = NumpyFolder().fold(bits.tobytes(), dtype, bits.shape, scale.astype(np.float32), finite=finite)
    return np.frombuffer(out, bits.dtype).reshape(bits.shape)


def finite_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    exponent = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000}[dtype]
    return (bits & exponent) != exponent


TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def assert_as_torch(bits: np.ndarray, dtype: str, scale: np.ndarray, what) -> None:
    """Where torch's result is finite the bits are equal; where it is not, ours is not either."""
    expected, got = torch_fold(bits, TORCH[dtype], scale), ours(bits, dtype, scale)
    keep = finite_bits(expected, dtype)
    np.testing.assert_array_equal(got[keep], expected[keep], err_msg=str(what))
    assert not finite_bits(got[~keep], dtype).any(), what


def one_times(values: np.ndarray, dtype: str) -> None:
    """The weight 1.0 times each float32 in ``values`` (as a row vector): the product is the value
    itself, so the fold is exactly the float32 -> ``dtype`` rounding."""
    n = len(values) - len(values) % 256
    ones = np.full((n, 1), {"BF16": 0x3F80, "F16": 0x3C00}[dtype], np.uint16)
    assert_as_torch(ones, dtype, values[:n].reshape(-1, 1), dtype)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("axis", [0, 1])
def test_every_16_bit_pattern_times_every_scale_matches_torch(axis, dtype):
    """Rows (axis 0) and columns (axis 1): 65,536 patterns x 13 scales each way."""
    for value in SCALES:
        shape = (256, 1) if axis == 0 else (1, 256)
        scale = np.full(shape, value, np.float32)
        scale.reshape(-1)[::3] = np.float32(value) * np.float32(-1.25)  # mixed signs and magnitudes per row/column
        assert_as_torch(ALL_BF16, dtype, scale, f"scale {value}")


def test_every_float16_rounding_tie_and_its_neighbours_matches_torch():
    """fp16 1.0 times float32 values a hair below, at and above each midpoint between float16
    neighbours (low 13 bits 0x0FFF, 0x1000, 0x1001, ...), over float16's whole range, subnormal
    results and overflow included."""
    high = np.arange(0x33000, 0x47900, dtype=np.uint32)  # float32 bits >> 13: from below fp16's subnormals to past 65504
    for low in (0x0FFF, 0x1000, 0x1001, 0x0000, 0x1FFF):
        for sign in (0, 0x80000000):
            one_times((((high << 13) | low) | sign).astype(np.uint32).view(np.float32), "F16")


def test_every_rounding_tie_and_its_neighbours_match_torch():
    """Weight 1.0 times a float32 whose low 16 bits are 0x7FFF, 0x8000 (the tie) or 0x8001, for
    every high half (both kept-bit parities, both signs, every exponent): the product is the vector
    itself, so the fold is exactly the float32 -> bf16 rounding."""
    high = np.arange(1 << 16, dtype=np.uint32)
    high = high[(high & 0x7F80) != 0x7F80]  # finite high halves
    for low in (0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF):
        one_times(((high << 16) | low).view(np.float32), "BF16")


@pytest.mark.parametrize("dtype, np_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)])
@pytest.mark.parametrize("shape, scale_shape", [
    ((96, 700), (96, 1)), ((96, 700), (1, 700)),  # rows, columns; several cache pieces per block
    ((16, 8, 3, 3), (16, 1, 1, 1)), ((16, 8, 3, 3), (1, 8, 1, 1)),  # conv output and input channels
    ((700,), (700,)),  # a bias
])
def test_random_weights_in_every_orientation_match_torch(dtype, np_dtype, shape, scale_shape):
    rng = np.random.default_rng(abs(hash((dtype, shape, scale_shape))) % 2**32)
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.05).to(np_dtype)
    uint = np.uint16 if dtype != "F32" else np.uint32
    bits = w.view(torch.int16 if dtype != "F32" else torch.int32).numpy().view(uint)
    scale = (1.0 + 0.3 * rng.standard_normal(scale_shape)).astype(np.float32)
    np.testing.assert_array_equal(ours(bits, dtype, scale, finite=True), torch_fold(bits, np_dtype, scale))
    assert np.prod(shape) * 4 > CACHE_BYTES or len(shape) != 2  # the 2-D cases span several pieces


def test_a_non_finite_weight_is_refused():
    w = torch.tensor([[1.0, float("inf"), 2.0, float("nan")], [3.0, 4.0, 5.0, 6.0]]).to(torch.bfloat16)
    bits = w.view(torch.int16).numpy().view(np.uint16)
    scale = np.full((2, 1), 1.5, np.float32)
    got, expected = ours(bits, "BF16", scale), torch_fold(bits, torch.bfloat16, scale)
    keep = finite_bits(expected, "BF16")
    np.testing.assert_array_equal(got[keep], expected[keep])
    assert (got[~keep] & 0x7F80 == 0x7F80).all()
    with pytest.raises(NonFinite) as caught:
        ours(bits, "BF16", scale, finite=True)
    assert caught.value.args[0] == 2


def test_an_overflow_is_counted():
    bits = np.array([[0x7F7F, 0x3F80]], np.uint16)  # bf16 max, 1.0
    with pytest.raises(NonFinite) as caught:
        ours(bits, "BF16", np.full((1, 1), 2.0, np.float32), finite=True)
    assert caught.value.args[0] == 1
