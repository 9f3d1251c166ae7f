"""Merged outputs against the reference: PEFT's merge_and_unload, bit for bit, and the merged
directory loaded by transformers reproducing the adapted model's outputs."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES
from peft_oracle import load_peft
from safetensors.torch import load_file

from ia3tools.cli import cli

LLAMA_REGEX = dict(target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=r".*\.down_proj")

# name -> (how to get base + adapter, dtype to load with, merge CLI extras)
CASES = {
    "llama-bf16-sharded": (dict(arch="llama", dtype=torch.bfloat16, shard_size="12KB"), torch.bfloat16),
    "llama-fp32-regex-targets": (dict(arch="llama", **LLAMA_REGEX), torch.float32),
    "llama-legacy-bin": (dict(arch="llama", bin_base=True), torch.float32),
    "gpt2-conv1d-fused-qkv": (dict(arch="gpt2"), torch.float32),
    "t5-encoder-decoder": (dict(arch="t5"), torch.float32),
    "opt-fp16-biases": (dict(arch="opt", dtype=torch.float16), torch.float16),
    "resnet-conv2d-regex": (dict(arch="resnet"), torch.float32),
    "bert-bare-backbone-head": ("fixture:bert-cls", torch.float32),
}

INPUTS = {
    "llama": lambda: dict(input_ids=torch.randint(3, 128, (2, 7))),
    "gpt2": lambda: dict(input_ids=torch.randint(3, 128, (2, 7))),
    "opt": lambda: dict(input_ids=torch.randint(3, 128, (2, 7))),
    "t5": lambda: dict(input_ids=torch.randint(3, 128, (2, 7)), decoder_input_ids=torch.randint(3, 128, (2, 5))),
    "resnet": lambda: dict(pixel_values=torch.randn(2, 3, 32, 32)),
    "bert": lambda: dict(input_ids=torch.randint(3, 128, (2, 7)),
                         attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2])),
}


def get_pair(tiny_pair, spec):
    if isinstance(spec, str):
        name = spec.split(":")[1]
        return FIXTURES / name / "base", FIXTURES / name / "adapter", "BertForSequenceClassification", "bert"
    spec = dict(spec)
    arch = spec.pop("arch")
    base, adapter = tiny_pair(arch, **spec)
    return base, adapter, None, arch


def merge_cli(*args):
    result = CliRunner().invoke(cli, ["merge", *map(str, args), "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_merge_is_bit_identical_to_peft_and_loads(tiny_pair, tmp_path, case):
    import transformers

    spec, dtype = CASES[case]
    base, adapter, task_cls, arch = get_pair(tiny_pair, spec)
    out = tmp_path / "merged"
    merge_cli(base, adapter, "-o", out)

    torch.manual_seed(0)
    inputs = INPUTS[arch]()
    peft_model = load_peft(base, adapter, task_cls, dtype=dtype)
    adapted = logits(peft_model, inputs)
    reference = peft_model.merge_and_unload()
    ref_state = reference.state_dict()

    ours = {}
    for f in sorted(out.glob("*.safetensors")):
        ours.update(load_file(f))
    assert ours, "no tensors written"
    for name, tensor in ours.items():
        assert name in ref_state, f"{name} is not a tensor of the merged PEFT model"
        expected = ref_state[name]
        assert tensor.dtype == expected.dtype, name
        assert torch.equal(tensor, expected), f"{name} differs from PEFT merge_and_unload"

    config = json.loads((out / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    loaded, info = cls.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    got = logits(loaded.eval(), inputs)
    assert torch.equal(got, logits(reference, inputs))
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(got, adapted, atol=tolerance, rtol=tolerance)

    verify = CliRunner().invoke(cli, ["verify", str(base), str(adapter), str(out)])
    assert verify.exit_code == 0, verify.output


def test_grouped_conv_merge_matches_peft(tmp_path):
    from tiny import GroupedConvNet, save_grouped_conv_pair

    base, adapter = save_grouped_conv_pair(tmp_path / "pair")
    out = tmp_path / "merged"
    merge_cli(base, adapter, "-o", out)
    peft_model = load_peft(base, adapter)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        adapted = peft_model(x)
        reference = peft_model.merge_and_unload()
    ours = load_file(out / "model.safetensors")
    for name, expected in reference.state_dict().items():
        assert torch.equal(ours[name], expected), name
    net = GroupedConvNet()
    net.load_state_dict(ours)
    with torch.no_grad():
        torch.testing.assert_close(net(x), adapted, atol=1e-5, rtol=1e-5)


def test_dtype_conversion_matches_peft_loaded_in_that_dtype(tiny_pair, tmp_path):
    base, adapter = tiny_pair("llama")
    out = tmp_path / "merged"
    merge_cli(base, adapter, "-o", out, "--dtype", "bf16")
    reference = load_peft(base, adapter, dtype=torch.bfloat16).merge_and_unload().state_dict()
    ours = load_file(out / "model.safetensors")
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name]), name
    assert CliRunner().invoke(cli, ["verify", str(base), str(adapter), str(out)]).exit_code == 0


def test_max_shard_size_reshards(tmp_path):
    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    out = tmp_path / "merged"
    merge_cli(base, adapter, "-o", out, "--max-shard-size", "10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        tensors = load_file(out / shard)
        # a shard holds more than one tensor only when they fit the limit together
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 10_000
    assert CliRunner().invoke(cli, ["verify", str(base), str(adapter), str(out)]).exit_code == 0


def test_side_files_and_provenance(tmp_path):
    from safetensors import safe_open

    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(out), "--json"])
    report = json.loads(result.output)
    import hashlib

    sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert report["adapter_sha256"] == sha and report["folded"] == 6 and report["tensors"] == 21
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (base / side).read_bytes()
    with safe_open(out / "model-00001-of-00002.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ia3tools_adapter_sha256"] == sha and meta["format"] == "pt"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["ia3tools_adapter_sha256"] == sha
    assert index["metadata"]["total_size"] == sum(t["bytes"] for t in report["shards"])
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w5 w6")["input_ids"]
