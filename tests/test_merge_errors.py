"""Merge failure paths: one line, exit 1, nothing at the output path, no staging leftovers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, ROOT, edit_json, weight_files
from safetensors.numpy import save_file

from ia3tools.cli import cli
from ia3tools.publish import MARK as STAGING_MARK

LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def leftovers(directory):
    return [p.name for p in directory.iterdir() if STAGING_MARK in p.name]


def test_existing_output_needs_force_and_force_replaces(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run("merge", *LLAMA, "-o", out)
    assert result.exit_code == 1
    assert result.output == f"Error: {out}: output already exists (use --force to replace it)\n"
    assert (out / "old.txt").read_text() == "old"
    assert run("merge", *LLAMA, "-o", out, "--force", "-q").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["base", "adapter", "base/sub"])
def test_output_inside_an_input_is_refused(tmp_path, fixture_copy, where):
    base, adapter = fixture_copy("llama")
    out = base.parent / where
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    result = run("merge", base, adapter, "-o", out, "--force")
    assert result.exit_code == 1 and "output is inside the input" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_output_containing_an_input_is_refused(tmp_path, fixture_copy):
    base, adapter = fixture_copy("llama")
    result = run("merge", base, adapter, "-o", base.parent, "--force")
    assert result.exit_code == 1 and "output would contain the input" in result.output
    assert base.exists()


def overflow_pair(root):
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    w = np.full((4, 4), 40000.0, dtype=np.float16)  # x 2.0 = 80000 > fp16 max 65504
    save_file({"proj.weight": w}, str(base / "model.safetensors"))
    save_file({"base_model.model.proj.ia3_l": np.full((4, 1), 2.0, np.float32)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "target_modules": ["proj"], "feedforward_modules": []}))
    return base, adapter


def test_fp16_overflow_after_the_cast_is_named(tmp_path):
    from safetensors.numpy import load_file

    base, adapter = overflow_pair(tmp_path)
    out = tmp_path / "merged"
    result = run("merge", base, adapter, "-o", out)
    assert result.exit_code == 1
    assert result.output == ("Error: tensor 'proj.weight': folding gives 16 non-finite value(s) after the cast to "
                             "F16 (overflow: the vector pushes the weight past the dtype's range)\n")
    assert not out.exists() and leftovers(tmp_path) == []
    assert load_file(base / "model.safetensors")["proj.weight"][0, 0] == 40000.0


def test_misfit_adapter_is_refused_before_writing(tmp_path, fixture_copy):
    base, adapter = fixture_copy("llama")
    edit_json(adapter / "adapter_config.json", feedforward_modules=[])
    out = tmp_path / "merged"
    result = run("merge", base, adapter, "-o", out)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {adapter}: adapter does not fit the base: model.layers.0.mlp.down_proj: "
                                    "vector shape [1, 64] is (1, in)")
    assert "(and 1 more; run `ia3tools check`)" in result.output
    assert not out.exists()


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "merged"
    result = run("merge", *LLAMA, "-o", out, "--dry-run", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["dry_run"] and len(report["plan"]["folds"]) == 6 and report["tensors"] == 21
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(tmp_path):
    assert run("merge", *LLAMA).exit_code == 2  # no -o
    assert run("merge", *LLAMA, "-o", tmp_path / "m", "--device", "tpu").exit_code == 2
    assert run("merge", *LLAMA, "-o", tmp_path / "m", "--dtype", "int8").exit_code == 2
    assert run("merge", *LLAMA, "-o", tmp_path / "m", "--max-shard-size", "lots").exit_code == 2


def test_verify_names_differing_missing_and_extra(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "merged"
    assert run("merge", FIXTURES / "gpt2" / "base",
               FIXTURES / "gpt2" / "adapter", "-o", out, "-q").exit_code == 0
    tensors = load_file(out / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"][0, 0] += 0.5
    del tensors["transformer.h.1.mlp.c_proj.weight"]
    tensors["extra.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = run("verify", FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", out)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("differs: transformer.h.0.attn.c_attn.weight (max abs error 0.5")
    assert "missing: transformer.h.1.mlp.c_proj.weight" in lines and "extra: extra.weight" in lines
    assert lines[-1] == "not identical: 3 tensor(s) differ, are missing or extra"


# --- starved processes (interrupted ones: test_publish.py) ------------------------------------

def big_pair(root, layers=6, rows=2048, cols=4096):
    """~200 MB fp32 base with a vector on every layer, so a merge takes long enough to interrupt."""
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    tensors = {f"layers.{i}.proj.weight": np.full((rows, cols), 0.5, np.float32) for i in range(layers)}
    save_file(tensors, str(base / "model.safetensors"))
    vectors = {f"base_model.model.layers.{i}.proj.ia3_l": np.full((rows, 1), 1.5, np.float32) for i in range(layers)}
    save_file(vectors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "target_modules": ["proj"], "feedforward_modules": []}))
    return base, adapter


def start_merge(base, adapter, out, **popen):
    return subprocess.Popen([sys.executable, "-m", "ia3tools", "merge", str(base), str(adapter), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **popen)


@pytest.mark.slow
def test_disk_full_is_a_clean_error(tmp_path):
    import resource

    base, adapter = big_pair(tmp_path, layers=2)
    out = tmp_path / "merged"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024 * 1024, 8 * 1024 * 1024))

    proc = start_merge(base, adapter, out, preexec_fn=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err == f"Error: {out}: cannot write the output: file size limit reached; nothing was written\n"
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "merged"
    assert run("merge", *LLAMA, "-o", out, "-q").exit_code == 0 and out.is_dir()
    bad = tmp_path / "c" / "d" / "merged"
    (tmp_path / "pair").mkdir()
    result = run("merge", *overflow_pair(tmp_path / "pair"), "-o", bad)  # fails while writing
    assert result.exit_code == 1 and not (tmp_path / "c").exists()


def test_force_without_atomic_exchange_still_replaces(tmp_path, monkeypatch):
    from ia3tools import publish

    monkeypatch.setattr(publish, "exchange", lambda a, b: False)  # e.g. not Linux, or an old kernel
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert run("merge", *LLAMA, "-o", out, "--force", "-q").exit_code == 0
    assert not (out / "old.txt").exists() and leftovers(tmp_path) == []


def test_no_fsync_writes_the_same_bytes_without_fsync(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    assert run("merge", *LLAMA, "-o", tmp_path / "durable", "-q").exit_code == 0
    durable_calls = len(calls)
    calls.clear()
    assert run("merge", *LLAMA, "-o", tmp_path / "fast", "-q", "--no-fsync").exit_code == 0
    assert durable_calls >= 4 and calls == []
    for f in weight_files(tmp_path / "durable"):
        assert (tmp_path / "fast" / f.name).read_bytes() == f.read_bytes()


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("merge", *LLAMA, "-o", tmp_path / "m", "--device", "cuda")
    assert result.exit_code == 1 and result.stderr == "Error: --device cuda: torch reports no CUDA device\n"
    assert not (tmp_path / "m").exists()
    auto = run("merge", *LLAMA, "-o", tmp_path / "auto", "--device", "auto", "--json")
    assert auto.exit_code == 0 and json.loads(auto.stdout)["device"] == "cpu"
