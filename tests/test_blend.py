import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, edit_json
from peft_oracle import ia3_layers
from safetensors.numpy import load_file, save_file

from ia3tools.cli import cli


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One Llama base; A and B target k/v/down, C only k/v (different targets)."""
    from tiny import add_ia3, build_model, save_pair

    root = tmp_path_factory.mktemp("blend")
    base, a = save_pair(root / "a", "llama")
    add_ia3(build_model("llama"), "llama", seed=7).save_pretrained(root / "b")
    add_ia3(build_model("llama"), "llama", seed=9, target_modules=["k_proj", "v_proj"],
            feedforward_modules=[]).save_pretrained(root / "c")
    return base, a, root / "b", root / "c"


BLENDS: list[Path] = []  # every adapter a blend in this module made, merged after each test


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if args[0] == "blend" and result.exit_code == 0:
        BLENDS.append(Path(args[list(args).index("-o") + 1]))
    return result


@pytest.fixture(autouse=True)
def every_blend_merges(adapters, tmp_path):
    """Whatever a test blends must merge into its base and verify."""
    BLENDS.clear()
    yield
    for i, blend in enumerate(list(BLENDS)):
        saved = json.loads((blend / "adapter_config.json").read_text()).get("modules_to_save") or []
        base = FIXTURES / "bert-cls" / "base" if "classifier" in saved else adapters[0]
        merged = tmp_path / f"merged-check-{i}"
        result = CliRunner().invoke(cli, ["merge", str(base), str(blend), "-o", str(merged), "-q"])
        assert result.exit_code == 0, (blend, result.output)
        assert CliRunner().invoke(cli, ["verify", str(base), str(blend), str(merged)]).exit_code == 0


def vectors(directory):
    return {k[len("base_model.model."):-len(".ia3_l")]: v
            for k, v in load_file(directory / "adapter_model.safetensors").items() if k.endswith(".ia3_l")}


def peft_weighted(base, pairs, weights):
    """PEFT's add_weighted_adapter on the named adapters; returns module -> blended vector."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), pairs[0][1], adapter_name=pairs[0][0])
    for name, path in pairs[1:]:
        model.load_adapter(path, adapter_name=name)
    model.add_weighted_adapter([n for n, _ in pairs], weights, "mix")
    return {m: layer.ia3_l["mix"].detach().numpy() for m, layer in ia3_layers(model) if "mix" in layer.ia3_l}


def test_linear_equals_peft_add_weighted_adapter_bitwise(adapters, tmp_path):
    base, a, b, _ = adapters
    result = run("blend", a, b, "--weights", "0.7", "0.3", "-o", tmp_path / "mix")
    assert result.exit_code == 0, result.output
    ours = vectors(tmp_path / "mix")
    reference = peft_weighted(base, [("a", a), ("b", b)], [0.7, 0.3])
    assert set(ours) == set(reference) and len(ours) == 6
    for module, expected in reference.items():
        assert ours[module].tobytes() == expected.astype(np.float32).tobytes(), module


def test_missing_zero_equals_peft_and_identity_leaves_the_module_alone(adapters, tmp_path):
    base, a, _, c = adapters
    assert run("blend", a, c, "-w", "0.7", "0.3", "--missing", "zero", "-o", tmp_path / "zero").exit_code == 0
    assert run("blend", a, c, "-w", "0.7", "0.3", "-o", tmp_path / "identity").exit_code == 0
    zero, identity, va = vectors(tmp_path / "zero"), vectors(tmp_path / "identity"), vectors(a)
    reference = peft_weighted(base, [("a", a), ("c", c)], [0.7, 0.3])
    for module, expected in reference.items():
        assert zero[module].tobytes() == expected.tobytes(), module
    down = "model.layers.0.mlp.down_proj"  # only A has it
    np.testing.assert_array_equal(zero[down], va[down] * np.float32(0.7))  # PEFT: scaled by 0.7
    np.testing.assert_array_equal(identity[down], va[down] * np.float32(0.7) + np.float32(0.3))
    np.testing.assert_allclose(identity[down], va[down], atol=0.3 * np.abs(va[down] - 1).max() + 1e-6)
    config = json.loads((tmp_path / "identity" / "adapter_config.json").read_text())
    # a and c scope their modules differently: the blend names exactly the modules it holds
    assert config["target_modules"] == sorted(identity)
    assert config["feedforward_modules"] == [m for m in sorted(identity) if m.endswith("down_proj")]


def test_geometric_from_first_principles(adapters, tmp_path):
    _, a, b, _ = adapters
    assert run("blend", a, b, "-w", "0.25,0.75", "--method", "geometric", "-o", tmp_path / "geo").exit_code == 0
    geo, va, vb = vectors(tmp_path / "geo"), vectors(a), vectors(b)
    for module in geo:
        expected = va[module].astype(np.float64) ** 0.25 * vb[module].astype(np.float64) ** 0.75
        np.testing.assert_allclose(geo[module], expected.astype(np.float32), rtol=2e-7)


def test_blend_loads_in_peft_and_matches_merging_it(adapters, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, a, b, c = adapters
    assert run("blend", a, b, c, "-w", "0.5", "0.3", "0.2", "-o", tmp_path / "mix").exit_code == 0
    meta = __import__("safetensors").safe_open(tmp_path / "mix" / "adapter_model.safetensors", "np").metadata()
    assert json.loads(meta["ia3tools_blend_sources"])[2]["weight"] == 0.2 and meta["ia3tools_blend_method"] == "linear"
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "mix").eval()
    assert run("merge", base, tmp_path / "mix", "-o", tmp_path / "merged", "-q").exit_code == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_heads_conflict_needs_heads_from(tmp_path):
    bert = FIXTURES / "bert-cls" / "adapter"
    other = tmp_path / "other"
    shutil.copytree(bert, other)
    weights = other / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.classifier.bias"] = np.full(3, 9.0, np.float32)
    save_file(tensors, str(weights))
    result = run("blend", bert, other, "-w", "0.5", "0.5", "-o", tmp_path / "x")
    assert result.exit_code == 1
    assert "tensor 'classifier.bias': modules_to_save tensor is in 2 adapters" in result.output
    assert "choose whose heads to keep with --heads-from" in result.output
    assert run("blend", bert, other, "-w", "0.5", "0.5", "-o", tmp_path / "x", "--heads-from", "other").exit_code == 0
    assert load_file(tmp_path / "x" / "adapter_model.safetensors")["base_model.model.classifier.bias"][0] == 9.0
    result = run("blend", bert, other, "-w", "0.5", "0.5", "-o", tmp_path / "y", "--heads-from", "nobody")
    assert result.exit_code == 1 and "--heads-from 'nobody' is not one of the adapters being blended" in result.output


def damaged(adapters, tmp_path, change):
    _, a, b, _ = adapters
    copy = tmp_path / "b2"
    shutil.copytree(b, copy)
    change(copy)
    return a, copy


def set_vector(directory, module, value):
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[f"base_model.model.{module}.ia3_l"] = value
    save_file(tensors, str(weights))


@pytest.mark.parametrize(
    "change, args, message",
    [
        (lambda d: edit_json(d / "adapter_config.json", fan_in_fan_out=True), [],
         "adapter_config.json: fan_in_fan_out is true here but false in"),
        (lambda d: set_vector(d, "model.layers.0.self_attn.k_proj", np.ones((17, 1), np.float32)), [],
         "tensor 'model.layers.0.self_attn.k_proj': vector shape [17, 1] differs from [16, 1]"),
        (lambda d: edit_json(d / "adapter_config.json", feedforward_modules=[]), [],
         "tensor 'model.layers.0.mlp.down_proj': feed-forward here but not in"),
        (lambda d: set_vector(d, "model.layers.1.self_attn.v_proj", -np.ones((16, 1), np.float32)),
         ["--method", "geometric"], "geometric blending needs positive entries; this vector has 16 <= 0"),
        (lambda d: edit_json(d / "adapter_config.json", peft_type="LORA"), [], "peft_type is 'LORA', not 'IA3'"),
    ],
)
def test_validation_errors(adapters, tmp_path, change, args, message):
    a, b = damaged(adapters, tmp_path, change)
    out = tmp_path / "out"
    result = run("blend", a, b, "-w", "0.5", "0.5", "-o", out, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_warnings_for_weights_and_base_spelling(adapters, tmp_path):
    a, b = damaged(adapters, tmp_path, lambda d: edit_json(d / "adapter_config.json",
                                                             base_model_name_or_path="models/Llama/"))
    edit_json(b / "adapter_config.json", base_model_name_or_path="models/Llama/")
    a2 = tmp_path / "a2"
    shutil.copytree(a, a2)
    edit_json(a2 / "adapter_config.json", base_model_name_or_path="models/llama")
    result = run("blend", a2, b, "-w", "0.5", "0.7", "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert "warning: linear weights sum to 1.2, not 1: every module is rescaled" in result.output
    assert "warning: base_model_name_or_path differs only in spelling" in result.output


def test_usage_and_output_errors(adapters, tmp_path):
    _, a, b, _ = adapters
    assert run("blend", a, b, "-w", "1", "-o", tmp_path / "o").exit_code == 2
    assert run("blend", a, "-w", "1", "-o", tmp_path / "o").exit_code == 1
    assert run("blend", a, b, "-w", "x", "y", "-o", tmp_path / "o").exit_code == 2
    missing = run("blend", a, "/no/such", "-w", "1", "1", "-o", tmp_path / "o")
    assert missing.exit_code == 1 and missing.stderr == "Error: /no/such: no such file or directory\n"
    inside = run("blend", a, b, "-w", "0.5", "0.5", "-o", a / "sub")
    assert inside.exit_code == 1 and "output is inside the input" in inside.output
    (tmp_path / "exists").mkdir()
    assert "already exists" in run("blend", a, b, "-w", "0.5", "0.5", "-o", tmp_path / "exists").output


def rescoped(source, destination, drop=None, **config):
    """A copy of adapter ``source`` with config changes and, optionally, one vector removed."""
    shutil.copytree(source, destination)
    edit_json(destination / "adapter_config.json", **config)
    if drop:
        weights = destination / "adapter_model.safetensors"
        tensors = load_file(weights)
        del tensors[f"base_model.model.{drop}.ia3_l"]
        save_file(tensors, str(weights))
    return destination


def test_exclusions_and_all_linear_from_every_input_still_merge_and_load(adapters, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, a, b, _ = adapters
    k0 = "model.layers.0.self_attn.k_proj"
    excluding = rescoped(a, tmp_path / "excluding", drop=k0, exclude_modules=[k0])
    linear = rescoped(b, tmp_path / "all-linear", target_modules="all-linear")
    assert run("blend", excluding, linear, "-w", "0.5", "0.5", "-o", tmp_path / "mix").exit_code == 0
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(vectors(tmp_path / "mix")) and k0 in config["target_modules"]
    assert config["exclude_modules"] is None
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "mix")
    loaded = {m: layer.ia3_l["default"].detach().numpy() for m, layer in ia3_layers(peft_model)}
    for module, vector in vectors(tmp_path / "mix").items():
        assert loaded[module].tobytes() == vector.tobytes(), module
    # identical scopes are kept as they are, all-linear included
    assert run("blend", linear, linear, "-w", "0.5", "0.5", "-o", tmp_path / "same").exit_code == 0
    assert json.loads((tmp_path / "same" / "adapter_config.json").read_text())["target_modules"] == "all-linear"


def test_negative_weights_space_separated(adapters, tmp_path):
    _, a, b, _ = adapters
    result = run("blend", a, b, "-w", "1.3", "-0.3", "-o", tmp_path / "extrapolated")
    assert result.exit_code == 0, result.output
    ours, va, vb = vectors(tmp_path / "extrapolated"), vectors(a), vectors(b)
    for module in ours:
        expected = np.zeros_like(va[module])
        expected += va[module] * np.float32(1.3)
        expected += vb[module] * np.float32(-0.3)
        assert ours[module].tobytes() == expected.tobytes(), module
    assert run("blend", a, b, "-w", "-0.3", "1.3", "-o", tmp_path / "other-order").exit_code == 0
    bogus = run("blend", a, b, "--bogus", "-w", "0.5", "0.5", "-o", tmp_path / "x")
    assert bogus.exit_code == 2 and "No such option '--bogus'" in bogus.output
