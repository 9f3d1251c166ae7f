"""Fold identities and the two folders' agreement (first principles, torch as the reference)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ia3tools import fold as fold_mod
from ia3tools.fold import NumpyFolder, TorchFolder, row_blocks

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def raw_of(t: torch.Tensor) -> bytes:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(list(DTYPES)), rows=st.integers(1, 9), cols=st.integers(1, 9),
       axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
def test_fold_equals_torch_promotion_and_one_cast(dtype, rows, cols, axis, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 10).to(DTYPES[dtype])
    shape = (rows, 1) if axis == 0 else (1, cols)
    v = 1 + torch.randn(shape, generator=g)
    expected = raw_of(torch.mul(w, v).to(w.dtype))  # what PEFT's merge computes
    assert NumpyFolder().fold(raw_of(w), dtype, (rows, cols), v.numpy()) == expected
    assert TorchFolder("cpu").fold(raw_of(w), dtype, (rows, cols), v.numpy()) == expected


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_ones_vector_changes_nothing(dtype):
    w = torch.randn(7, 5).to(DTYPES[dtype])
    assert NumpyFolder().fold(raw_of(w), dtype, (7, 5), np.ones((7, 1), np.float32)) == raw_of(w)


def test_folding_equals_scaling_at_runtime():
    """x @ (W * v_col).T == (x * v) @ W.T for a feed-forward (input) vector, in float64."""
    w, v, x = torch.randn(6, 4, dtype=torch.float64), torch.rand(1, 4, dtype=torch.float64) + 0.5, torch.randn(3, 4)
    folded = np.frombuffer(NumpyFolder().fold(w.numpy().tobytes(), "F64", (6, 4), v.numpy()), np.float64)
    folded = torch.from_numpy(folded.reshape(6, 4).copy())
    torch.testing.assert_close(x.double() @ folded.T, (x.double() * v) @ w.T)


def test_row_blocks_cover_the_tensor_once():
    blocks = list(row_blocks((10, 3), 4, block_bytes=30))
    assert blocks == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2)]
    assert list(row_blocks((3, 1000), 4, block_bytes=10)) == [(0, 1), (1, 1), (2, 1)]


def test_torch_folder_merge_is_bit_identical_to_numpy_path(tmp_path, monkeypatch):
    """The device path (torch) writes the same bytes as the CPU path, checked here on torch's CPU."""
    from conftest import FIXTURES, weight_files

    from ia3tools.commands import merge as merge_mod
    from ia3tools import MergeOptions, merge

    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    merge(base, adapter, tmp_path / "numpy")
    monkeypatch.setattr(merge_mod, "make_folder", lambda device: TorchFolder("cpu"))
    monkeypatch.setattr(fold_mod, "BLOCK_BYTES", 256)  # many blocks: exercises read-ahead and slicing
    report = merge(base, adapter, tmp_path / "torch", MergeOptions())
    assert report.device == "cpu"
    for f in weight_files(tmp_path / "numpy"):
        assert (tmp_path / "torch" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_is_bit_identical_to_cpu(tmp_path):
    from conftest import FIXTURES, weight_files

    from ia3tools import MergeOptions, merge

    for name in ("llama", "gpt2", "bert-cls"):
        base, adapter = FIXTURES / name / "base", FIXTURES / name / "adapter"
        merge(base, adapter, tmp_path / f"{name}-cpu")
        merge(base, adapter, tmp_path / f"{name}-cuda", MergeOptions(device="cuda"))
        for f in weight_files(tmp_path / f"{name}-cpu"):
            assert (tmp_path / f"{name}-cuda" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_non_finite_count_matches_isfinite(dtype):
    from ia3tools.fold import _non_finite
    from ia3tools.formats.dtypes import DTYPES

    values = np.array([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan, 1e-30, -3.0], dtype=np.float64)
    a = values.astype(DTYPES[dtype].numpy)
    assert _non_finite(a, dtype) == int(np.count_nonzero(~np.isfinite(a.astype(np.float64)))) == 3
