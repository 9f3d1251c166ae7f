"""The light install: without torch (nor transformers, onnx, safetensors, peft), inspect, check,
merge, verify and blend run on safetensors checkpoints and import none of them; what needs an
extra says which, in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

FAULTS = Path(__file__).with_name("faults.py")
LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")


def light(*args, log: Path):
    env = dict(os.environ, IA3TOOLS_IMPORT_LOG=str(log))
    return subprocess.run([sys.executable, str(FAULTS), "light-install", "--", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_core_commands_import_no_torch(tmp_path):
    log = tmp_path / "imports.log"
    runs = [
        ("inspect", LLAMA[1]), ("inspect", LLAMA[0]), ("check", *LLAMA),
        ("merge", *LLAMA, "-o", tmp_path / "merged", "-q", "--device", "auto"),
        ("verify", *LLAMA, tmp_path / "merged"),
        ("blend", LLAMA[1], LLAMA[1], "-w", "0.5", "0.5", "-o", tmp_path / "blend", "-q"),
        ("merge", FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", "-o", tmp_path / "gpt2", "--json"),
    ]
    for args in runs:
        done = light(*args, log=log)
        assert done.returncode == 0, (args, done.stderr)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    attempted = log.read_text().split() if log.exists() else []
    assert set(attempted) <= {"torch"}, attempted  # --device auto may look for torch, and does without it


@pytest.mark.parametrize("args, extra, needs", [
    (["merge", "{bin}", LLAMA[1], "-o", "{tmp}/m"], "torch", "reading .bin checkpoints"),
    (["merge", *LLAMA, "-o", "{tmp}/m", "--device", "cuda"], "torch", "--device cuda"),
    (["export-onnx", LLAMA[0], "-o", "{tmp}/x"], "onnx", "export-onnx"),
])
def test_what_needs_an_extra_says_which(tmp_path, args, extra, needs):
    base = tmp_path / "bin-base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"not read without torch")
    (base / "config.json").write_text("{}")
    args = [str(a).replace("{bin}", str(base)).replace("{tmp}", str(tmp_path)) for a in args]
    done = light(*args, log=tmp_path / "log")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert needs in lines[0] and f"pip install 'ia3tools[{extra}]'" in lines[0], lines[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()


def test_the_package_declares_no_heavy_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in project["dependencies"]}
    assert core == {"numpy", "ml_dtypes", "click", "tqdm", "huggingface_hub"}
    assert project["optional-dependencies"]["torch"] == ["torch>=2.6"]
    assert "ia3tools[torch]" in project["optional-dependencies"]["onnx"]
