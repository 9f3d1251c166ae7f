import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, edit_json
from safetensors import safe_open

from ia3tools.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_inspect_adapter_json_matches_the_file():
    adapter = FIXTURES / "llama" / "adapter"
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        vectors = {k: f.get_tensor(k) for k in f.keys()}
    assert report["vectors"] == len(vectors)
    assert report["parameters"] == sum(v.size for v in vectors.values())
    k_proj = np.concatenate([v.ravel() for k, v in vectors.items() if "k_proj" in k])
    group = next(g for g in report["groups"] if g["group"] == "model.layers.*.self_attn.k_proj")
    assert group["vectors"] == 2 and group["length"] == 16 and group["scales"] == "outputs"
    assert group["min"] == pytest.approx(float(k_proj.min())) and group["max"] == pytest.approx(float(k_proj.max()))
    assert group["mean"] == pytest.approx(float(k_proj.mean()), rel=1e-6)
    down = next(g for g in report["groups"] if g["group"] == "model.layers.*.mlp.down_proj")
    assert down["scales"] == "inputs" and down["feedforward"] is True


def test_inspect_adapter_human_is_one_row_per_group():
    result = run("inspect", FIXTURES / "bert-cls" / "adapter")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert any(line.startswith("heads        classifier.bias[3], classifier.weight[3, 32]") for line in lines)
    assert sum("bert.encoder.layer.*." in line for line in lines) == 4


def test_inspect_counts_near_zero_and_nan(fixture_copy):
    from safetensors.numpy import load_file, save_file

    _, adapter = fixture_copy("llama")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    tensors[key][:3, 0] = [0.0, 1e-5, np.nan]
    save_file(tensors, str(weights))
    report = json.loads(run("inspect", adapter, "--json").output)
    group = next(g for g in report["groups"] if g["group"] == "model.layers.*.self_attn.k_proj")
    assert (group["near_zero"], group["nan"], group["inf"]) == (2, 1, 0)


def test_inspect_checkpoint_json():
    base = FIXTURES / "llama" / "base"
    report = json.loads(run("inspect", base, "--json").output)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert report["kind"] == "checkpoint" and report["sharded"] is True
    assert report["tensors"] == len(index["weight_map"])
    assert report["bytes"] == index["metadata"]["total_size"]
    assert [s["name"] for s in report["shards"]] == sorted(set(index["weight_map"].values()))
    assert report["dtypes"] == [{"dtype": "BF16", "tensors": 21, "parameters": 26784, "bytes": 53568}]


def test_inspect_single_file():
    result = run("inspect", FIXTURES / "gpt2" / "base" / "model.safetensors")
    assert result.exit_code == 0 and "(safetensors, 1 shard)" in result.output


def test_inspect_bad_file_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    result = run("inspect", bad)
    assert result.exit_code == 1
    assert result.output == f"Error: {bad}: file is 4 bytes, shorter than the 8-byte header length\n"


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert-cls"])
def test_check_fits(name):
    result = run("check", FIXTURES / name / "base", FIXTURES / name / "adapter")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def test_check_json_lists_folds_and_heads():
    result = run("check", FIXTURES / "bert-cls" / "base", FIXTURES / "bert-cls" / "adapter", "--json")
    report = json.loads(result.output)
    assert report["ok"] is True and report["command"] == "check" and report["errors"] == [] and len(report["folds"]) == 8
    assert {h["output"] for h in report["heads"]} == {"classifier.weight", "classifier.bias"}
    key = next(f for f in report["folds"] if f["module"] == "bert.encoder.layer.0.attention.self.key")
    assert key["scales"] == "rows" and key["output"] == "bert.encoder.layer.0.attention.self.key.weight"


def test_check_misfit_exit_1_with_one_line_per_problem(fixture_copy):
    base, adapter = fixture_copy("llama")
    edit_json(adapter / "adapter_config.json", target_modules=["k_proj", "v_proj", "down_proj", "q_prj"])
    result = run("check", base, adapter)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: target_modules entry 'q_prj' matches no module of the base",
        "does not fit: 1 problem(s)",
    ]
    report = json.loads(run("check", base, adapter, "--json").output)
    assert report["ok"] is False and report["errors"][0]["code"] == "unmatched-target"


def test_check_wrong_base_lists_every_vector():
    result = run("check", FIXTURES / "gpt2" / "base", FIXTURES / "llama" / "adapter")
    assert result.exit_code == 1
    assert "error: model.layers.0.self_attn.k_proj: no weight model.layers.0.self_attn.k_proj.weight " \
           "(or across a backbone prefix) in the base" in result.output.splitlines()


def test_check_unreadable_adapter(fixture_copy):
    base, adapter = fixture_copy("llama")
    edit_json(adapter / "adapter_config.json", peft_type="LORA")
    result = run("check", base, adapter)
    assert result.exit_code == 1
    assert result.output == f"Error: {adapter / 'adapter_config.json'}: peft_type is 'LORA', not 'IA3'\n"
    assert "Traceback" not in result.output


def test_usage_errors_exit_2():
    assert run("check").exit_code == 2
    assert run("check", "a", "b", "c").exit_code == 2
    assert run("inspect", FIXTURES / "llama" / "base", "--bogus").exit_code == 2


def test_a_missing_input_is_a_bad_input_exit_1():
    result = run("inspect", "/no/such/path")
    assert result.exit_code == 1 and result.stderr == "Error: /no/such/path: no such file or directory\n"


def test_python_dash_m_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ia3tools", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ia3tools, version ")
