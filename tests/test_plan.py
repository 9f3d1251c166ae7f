import numpy as np
import pytest
import torch
from conftest import FIXTURES, edit_json
from peft_oracle import ia3_layers, load_peft, peft_scaling

from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.plan import build_plan

PAIRS = {
    "llama": lambda pair: (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", None),
    "gpt2": lambda pair: (FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", None),
    "bert-cls": lambda pair: (FIXTURES / "bert-cls" / "base", FIXTURES / "bert-cls" / "adapter",
                              "BertForSequenceClassification"),
    "t5": lambda pair: (*pair("t5"), None),
    "resnet-regex": lambda pair: (*pair("resnet"), None),
    "opt": lambda pair: (*pair("opt"), None),
}


def plan_for(base, adapter):
    return build_plan(open_checkpoint(base), read_adapter(adapter))


@pytest.mark.parametrize("arch", list(PAIRS))
def test_plan_places_every_vector_as_peft_does(tiny_pair, arch):
    base, adapter, task_cls = PAIRS[arch](tiny_pair)
    plan = plan_for(base, adapter)
    assert plan.ok, [f.line() for f in plan.findings]
    peft_model = load_peft(base, adapter, task_cls)
    layers = dict(ia3_layers(peft_model))
    assert {f.module for f in plan.folds} == set(layers)
    ckpt = open_checkpoint(base)
    vectors = read_adapter(adapter).vectors
    for fold in plan.folds:
        layer = layers[fold.module]
        assert fold.feedforward == layer.is_feedforward
        shape = ckpt.tensors[fold.weight].shape
        ours = np.broadcast_to(fold.scale(vectors[fold.module], shape), shape)
        np.testing.assert_array_equal(ours, peft_scaling(layer).float().numpy())
        base_bias = layer.get_base_layer().bias
        assert (fold.bias is not None) == (base_bias is not None and not layer.is_feedforward)


def test_grouped_conv_feedforward(tmp_path):
    from tiny import save_grouped_conv_pair

    base, adapter = save_grouped_conv_pair(tmp_path)
    plan = plan_for(base, adapter)
    assert plan.ok
    grouped = next(f for f in plan.folds if f.module == "grouped")
    assert (grouped.layer, grouped.axis, grouped.groups, grouped.length) == ("conv2d", 1, 2, 8)
    layers = dict(ia3_layers(load_peft(base, adapter)))
    ckpt = open_checkpoint(base)
    shape = ckpt.tensors["grouped.weight"].shape
    ours = np.broadcast_to(grouped.scale(read_adapter(adapter).vectors["grouped"], shape), shape)
    np.testing.assert_array_equal(ours, peft_scaling(layers["grouped"]).numpy())


def test_bare_backbone_prefix_and_head():
    plan = plan_for(FIXTURES / "bert-cls" / "base", FIXTURES / "bert-cls" / "adapter")
    assert plan.names.kind == "strip" and plan.names.prefix == "bert" and plan.names.rename_output
    fold = next(f for f in plan.folds if f.module == "bert.encoder.layer.0.attention.self.key")
    assert fold.weight == "encoder.layer.0.attention.self.key.weight"
    assert fold.bias == "encoder.layer.0.attention.self.key.bias"
    assert plan.output_name(fold.weight) == "bert.encoder.layer.0.attention.self.key.weight"
    heads = {h.name: h for h in plan.heads}
    assert heads["classifier.weight"].replaces is None
    assert plan.head_output(heads["classifier.weight"]) == "classifier.weight"


def test_adapter_without_prefix_on_prefixed_base(tmp_path, fixture_copy):
    """An adapter trained on a bare backbone applied to a task checkpoint: base names add 'bert.'."""
    from safetensors.numpy import load_file, save_file

    base, adapter = fixture_copy("bert-cls")
    tensors = load_file(base / "model.safetensors")
    save_file({f"bert.{k}": v for k, v in tensors.items()}, str(base / "model.safetensors"))
    weights = adapter / "adapter_model.safetensors"
    vectors = {k.replace("base_model.model.bert.", "base_model.model."): v
               for k, v in load_file(weights).items() if k.endswith("ia3_l")}
    save_file(vectors, str(weights))
    edit_json(adapter / "adapter_config.json", modules_to_save=None)
    plan = plan_for(base, adapter)
    assert plan.ok and plan.names.kind == "add" and plan.names.prefix == "bert"
    assert plan.folds[0].weight.startswith("bert.encoder.")
    assert plan.output_name(plan.folds[0].weight) == plan.folds[0].weight


def errors(plan):
    return [f.line() for f in plan.errors]


def test_square_weight_with_wrong_orientation_is_caught(fixture_copy):
    # attention.output.dense is 32x32: its (1, 32) vector would broadcast either way.
    base, adapter = fixture_copy("bert-cls")
    edit_json(adapter / "adapter_config.json", feedforward_modules=["layer.0.output.dense", "layer.1.output.dense"])
    plan = plan_for(base, adapter)
    assert "error: bert.encoder.layer.0.attention.output.dense: vector shape [1, 32] is (1, in): scales inputs, " \
           "feed-forward, but feedforward_modules does not match it" in errors(plan)


def test_typo_target_is_named(tiny_pair, tmp_path):
    import shutil

    base, adapter = tiny_pair("t5")
    shutil.copytree(adapter, tmp_path / "a")
    edit_json(tmp_path / "a" / "adapter_config.json", target_modules=["k", "v", "wo", "w0"])
    assert errors(plan_for(base, tmp_path / "a")) == [
        "error: target_modules entry 'w0' matches no module of the base"]


def test_feedforward_outside_targets(fixture_copy):
    base, adapter = fixture_copy("llama")
    edit_json(adapter / "adapter_config.json", feedforward_modules=["down_proj", "up_proj"])
    assert "error: feedforward_modules entry 'up_proj' is not in target_modules" in errors(plan_for(base, adapter))


def test_fan_in_fan_out_inconsistent(fixture_copy):
    base, adapter = fixture_copy("gpt2")
    edit_json(adapter / "adapter_config.json", fan_in_fan_out=False)
    assert ("error: transformer.h.0.attn.c_attn: vector of length 96 fits weight [32, 96] only transposed: "
            "fan_in_fan_out is false but the weight is stored the other way") in errors(plan_for(base, adapter))


def test_wrong_length_and_nan(fixture_copy):
    from safetensors.numpy import load_file, save_file

    base, adapter = fixture_copy("llama")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"] = np.ones((17, 1), np.float32)
    v = tensors["base_model.model.model.layers.1.self_attn.v_proj.ia3_l"]
    v[0, 0], v[1, 0], v[2, 0] = np.nan, np.inf, np.nan
    save_file(tensors, str(weights))
    lines = errors(plan_for(base, adapter))
    assert "error: model.layers.0.self_attn.k_proj: vector length 17 does not fit weight shape [16, 32]" in lines
    assert "error: model.layers.1.self_attn.v_proj: vector has 2 NaN and 1 Inf entries" in lines


def test_head_shape_mismatch(fixture_copy):
    from safetensors.numpy import load_file, save_file

    base, adapter = fixture_copy("bert-cls")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.bert.pooler.dense.weight"] = np.ones((3, 32), np.float32)
    save_file(tensors, str(weights))
    edit_json(adapter / "adapter_config.json", modules_to_save=["classifier", "pooler"])
    assert ("error: bert.pooler.dense.weight: modules_to_save tensor has shape [3, 32], "
            "base pooler.dense.weight has [32, 32]") in errors(plan_for(base, adapter))


def test_unfoldable_dtype_is_named(tmp_path, fixture_copy):
    from safetensors.torch import load_file, save_file

    base, adapter = fixture_copy("gpt2")
    tensors = load_file(base / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].to(torch.int8)
    save_file(tensors, str(base / "model.safetensors"))
    assert ("error: transformer.h.0.attn.c_attn: weight transformer.h.0.attn.c_attn.weight is I8; only F16, BF16, F32 and F64 "
            "can be folded") in errors(plan_for(base, adapter))
