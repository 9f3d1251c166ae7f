"""diff: one-sided tensors, dtype and shape changes, changed tensors with their counts and largest
differences (checked against numpy on the loaded tensors), identical tensors counted by bytes
without decoding, and metadata and config differences; exit 0 only when identical."""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, cli_run, edit_json
from safetensors.numpy import load_file, save_file

import ia3tools
import ia3tools.compare

LLAMA = FIXTURES / "llama"


def run(*args):
    result = cli_run("diff", *args)
    assert result.exit_code in (0, 1), result.output
    return result


def as_json(*args):
    result = run(*args, "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == (0 if doc["ok"] else 1)
    return doc


def one_file(tmp_path, name, tensors: dict, metadata=None, config=None):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata=metadata or {"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_identical_checkpoints_are_compared_as_bytes_and_never_decoded(monkeypatch, tmp_path):
    copy = shutil.copytree(LLAMA / "base", tmp_path / "copy")
    decoded = []
    monkeypatch.setattr(ia3tools.compare, "block_change", lambda *a, **k: decoded.append(a))
    report = ia3tools.diff(LLAMA / "base", copy)
    assert report.ok and report.differences == [] and report.keys == []
    assert report.identical == 21 and decoded == []
    result = run(LLAMA / "base", copy)
    assert result.exit_code == 0 and "identical: 21 tensors" in result.stdout


def test_a_merge_against_its_base(tmp_path):
    merged = tmp_path / "merged"
    assert cli_run("merge", LLAMA / "base", LLAMA / "adapter", "-o", merged, "-q").exit_code == 0
    doc = as_json(LLAMA / "base", merged)
    assert not doc["ok"]
    a, b = {}, {}
    for f in (LLAMA / "base").glob("*.safetensors"):
        a.update(load_file(f))
    for f in merged.glob("*.safetensors"):
        b.update(load_file(f))
    expected = {}
    for name in a:
        x, y = a[name], b[name]
        uint = {2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        differ = x.view(uint) != y.view(uint)
        if differ.any():
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            gap = np.abs(x64 - y64)
            rel = gap / np.maximum(np.abs(x64), np.abs(y64))
            expected[name] = (int(differ.sum()), x.size, gap.max(), rel[differ].max())
    assert len(expected) == 6  # k, v, down_proj in two layers
    got = {d["tensor"]: d for d in doc["differences"]}
    assert set(got) == set(expected) and {d["problem"] for d in got.values()} == {"values"}
    for name, (elements, total, max_abs, max_rel) in expected.items():
        d = got[name]
        assert (d["elements"], d["total"]) == (elements, total)
        assert d["max_abs"] == pytest.approx(max_abs, rel=1e-6) and d["max_rel"] == pytest.approx(max_rel, rel=1e-6)
    assert doc["identical"] == len(a) - 6
    assert {k["key"] for k in doc["keys"] if k["where"] == "metadata"} >= {"ia3tools_version", "ia3tools_adapter"}


def test_one_sided_dtype_and_shape_changes(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = one_file(tmp_path, "a", {"same": x, "gone": x, "cast": x, "reshaped": x})
    b = one_file(tmp_path, "b", {"same": x, "new": x[:1], "cast": x.astype(np.float16), "reshaped": x.reshape(4, 3)})
    doc = as_json(a, b)
    rows = {d["tensor"]: d for d in doc["differences"]}
    assert rows["gone"]["problem"] == "only-in-a" and rows["gone"]["a"] == ["F32", [3, 4]]
    assert rows["new"]["problem"] == "only-in-b" and rows["new"]["b"] == ["F32", [1, 4]]
    assert rows["cast"]["problem"] == "dtype-or-shape" and rows["cast"]["b"] == ["F16", [3, 4]]
    assert rows["reshaped"]["problem"] == "dtype-or-shape" and rows["reshaped"]["b"] == ["F32", [4, 3]]
    assert doc["identical"] == 1
    text = run(a, b).stdout
    assert "only in A: gone (F32 [3, 4])" in text and "only in B: new (F32 [1, 4])" in text
    assert "dtype or shape: cast: F32 [3, 4] -> F16 [3, 4]" in text


def test_bits_decide_zero_signs_and_nans(tmp_path):
    x = np.array([np.nan, 1.0, 0.0, 2.0], np.float32)
    y = np.array([np.nan, 1.0, -0.0, 2.5], np.float32)
    a = one_file(tmp_path, "a", {"same_nan": x[:1].copy(), "t": x, "ints": np.array([1, 5, 9], np.int64)})
    b = one_file(tmp_path, "b", {"same_nan": x[:1].copy(), "t": y, "ints": np.array([1, 7, 9], np.int64)})
    doc = as_json(a, b)
    rows = {d["tensor"]: d for d in doc["differences"]}
    assert doc["identical"] == 1  # the NaN tensor: the same bits, though NaN != NaN
    assert rows["t"]["elements"] == 2 and rows["t"]["max_abs"] == 0.5 and rows["t"]["max_rel"] == 0.2
    assert rows["ints"]["elements"] == 1 and rows["ints"]["max_abs"] == 2


def test_metadata_and_config_keys(tmp_path):
    x = np.zeros(2, np.float32)
    a = one_file(tmp_path, "a", {"t": x}, {"format": "pt", "kept": "1", "old": "x"}, {"model_type": "llama", "n": 2})
    b = one_file(tmp_path, "b", {"t": x}, {"format": "pt", "kept": "2"}, {"model_type": "llama", "n": 3, "extra": [1]})
    doc = as_json(a, b)
    assert doc["differences"] == [] and not doc["ok"]
    keys = {(k["where"], k["key"]): (k["a"], k["b"]) for k in doc["keys"]}
    assert keys == {("metadata", "kept"): ("1", "2"), ("metadata", "old"): ("x", "<absent>"),
                    ("config", "n"): (2, 3), ("config", "extra"): ("<absent>", [1])}
    text = run(a, b).stdout
    assert 'config: n: 2 -> 3' in text and 'metadata: old: "x" -> <absent>' in text


def test_two_adapters(tmp_path):
    adapter = shutil.copytree(LLAMA / "adapter", tmp_path / "adapter")
    edit_json(adapter / "adapter_config.json", feedforward_modules=["down_proj", "up_proj"])
    doc = as_json(LLAMA / "adapter", adapter)
    assert doc["differences"] == [] and doc["identical"] == 6
    assert [(k["where"], k["key"]) for k in doc["keys"]] == [("config", "feedforward_modules")]


def test_a_missing_input_is_one_line(tmp_path):
    result = cli_run("diff", LLAMA / "base", tmp_path / "nope")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "nope" in result.stderr
