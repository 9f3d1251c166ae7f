"""Runtime adapters: one ONNX export of a base, IA3 adapters switched per run in onnxruntime.

The consumers in the loop: onnxruntime fed by the model's own tokenizer (padded rows, sentence
pairs for BERT) with each adapter file active, against PEFT's model for that adapter, and against
transformers' base model with none active."""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURES, assert_refused, cli_run
from peft_oracle import load_peft
from test_schema import envelope

sys.path.insert(0, str(FIXTURES))
from tiny import add_ia3, build_model, save_bert_tokenizer, save_tokenizer  # noqa: E402


# arch -> (adapter A's overrides, adapter B's: a subset of the modules), both with random vectors
SETUPS = {
    "llama": ({}, dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
    "gpt2": ({}, dict(target_modules=["mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "bert-cls": (dict(task_type=None, modules_to_save=None),
                 dict(task_type=None, modules_to_save=None, target_modules=["value"], feedforward_modules=[])),
}
TEXTS = {"llama": ["w3 w4 w5 w6 w7", "w9 w10"], "gpt2": ["w3 w4 w5 w6 w7", "w9 w10"],
         "bert-cls": [("w5 w6 w7", "w8 w9"), ("w10", "w11 w12")]}


def model_for(arch, **config):
    """The test's model: BERT as a bare encoder (feature extraction: its per-token hidden states
    show every vector; a tiny classifier's logits barely move), the others with their LM head."""
    model = build_model(arch, **config)
    return model.base_model if arch == "bert-cls" else model


def make_setup(root, arch):
    base = root / "base"
    model_for(arch).save_pretrained(base)  # random non-zero biases (GPT-2's c_attn, BERT's key/value)
    (save_bert_tokenizer if arch == "bert-cls" else save_tokenizer)(base)
    adapters = []
    for name, (overrides, seed) in zip(("alpha", "beta"), ((SETUPS[arch][0], 11), (SETUPS[arch][1], 12))):
        add_ia3(model_for(arch), arch, seed=seed, **overrides).save_pretrained(root / name)
        adapters.append(root / name)
    return base, adapters


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"runtime-{arch}")
            base, adapters = make_setup(root, arch)
            result = cli_run("export-onnx", base, "-o", root / "onnx", "--runtime-adapters", *adapters, "--json")
            made[arch] = (root, base, adapters, envelope(result, "export-onnx", True))  # valid against the schema
        return made[arch]

    return get


def session(onnx_dir):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def tokenized(base, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    texts = TEXTS[arch]
    if arch == "bert-cls":
        return tok([a for a, _ in texts], [b for _, b in texts], padding=True, return_tensors="np")
    return tok(texts, padding=True, return_tensors="np")


def run_with(sess, feed, adapter_file=None):
    options = ort.RunOptions()
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options.add_active_adapter(adapter)
    return sess.run(None, feed, options)[0]


def real(outputs, mask, arch):
    """The positions that count: the unpadded tokens."""
    return outputs[mask.astype(bool)]


def first(result):
    return (result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits).numpy()


@pytest.mark.parametrize("arch", list(SETUPS))
def test_each_adapter_file_gives_peft_and_none_gives_the_base(exported, arch):
    root, base, adapters, report = exported(arch)
    assert report["parity"]["passed"]
    assert [s["adapter"] for s in report["parity"]["switching"]] == ["alpha", "beta", None, "alpha"]
    for step in report["parity"]["switching"]:
        assert all(e["max_abs"] <= 1e-4 for e in step["outputs"].values()), step
    sess = session(root / "onnx")
    tok = tokenized(base, arch)
    inputs = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in tok.items() if k in inputs}
    assert set(feed) == set(report["inputs"])  # the tokenizer's own inputs, no slot required
    assert tok["attention_mask"].min() == 0  # a padded row
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}

    import transformers

    cls = getattr(transformers, json.loads((base / "config.json").read_text())["architectures"][0])
    with torch.no_grad():
        plain = first(cls.from_pretrained(base).eval()(**torch_feed))
    mask = tok["attention_mask"]
    none = run_with(sess, feed)
    np.testing.assert_allclose(real(none, mask, arch), real(plain, mask, arch), atol=1e-4, rtol=0)
    for adapter in adapters + adapters[:1]:  # and back again: the first adapter after the second
        with torch.no_grad():
            expected = first(load_peft(base, adapter)(**torch_feed))
        got = run_with(sess, feed, root / "onnx" / "adapters" / f"{adapter.name}.onnx_adapter")
        np.testing.assert_allclose(real(got, mask, arch), real(expected, mask, arch), atol=1e-4, rtol=0)
        assert np.abs(real(expected, mask, arch) - real(plain, mask, arch)).max() > 1e-3  # 10x atol: it matters
    np.testing.assert_allclose(run_with(sess, feed), none, atol=0, rtol=0)  # none again: the base, exactly


def test_slots_are_overridable_inputs_all_ones_and_the_adapter_files_are_flat_float32(exported):
    root, _, adapters, report = exported("llama")
    model = onnx.load(str(root / "onnx" / "model.onnx"))
    inputs = {i.name for i in model.graph.input}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    slots = {s["name"]: s for s in report["slots"]}
    # Llama: k_proj and v_proj scale outputs, down_proj its inputs, in both layers
    assert len(slots) == 6 and {s["scales"] for s in slots.values()} == {"outputs", "inputs"}
    for name, slot in slots.items():
        assert name in inputs and name.endswith(".ia3_l")
        assert inits[name].shape == (slot["length"],) and np.all(inits[name] == 1.0) and inits[name].dtype == np.float32
    meta = {p.key: p.value for p in model.metadata_props}
    assert {s["name"] for s in json.loads(meta["ia3tools.slots"])} == set(slots)
    for adapter, count in zip(adapters, (6, 4)):
        params = ort.AdapterFormat.read_adapter(str(root / "onnx" / "adapters" / f"{adapter.name}.onnx_adapter"))
        values = params.get_parameters()
        assert len(values) == count and set(values) <= set(slots)
        for name, value in values.items():
            array = value.numpy()
            assert array.dtype == np.float32 and array.shape == (slots[name]["length"],)
    files = {f["name"]: f for f in report["runtime_adapters"]}
    assert files["alpha"]["file"] == "adapters/alpha.onnx_adapter" and files["beta"]["vectors"] == 4
    assert report["files"]["adapters/alpha.onnx_adapter"] == files["alpha"]["bytes"]


def test_onnx_adapter_adds_an_adapter_later(exported, tmp_path):
    root, base, _, _ = exported("llama")
    add_ia3(build_model("llama"), "llama", seed=21, target_modules=["v_proj", "down_proj"],
            feedforward_modules=["down_proj"]).save_pretrained(tmp_path / "gamma")
    report = envelope(cli_run("onnx-adapter", tmp_path / "gamma", "--for", root / "onnx", "--json"), "onnx-adapter", True)
    assert report["adapters"][0]["file"] == "adapters/gamma.onnx_adapter" and report["slots"] == 6
    tok = tokenized(base, "llama")
    feed = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    with torch.no_grad():
        expected = load_peft(base, tmp_path / "gamma")(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
    got = run_with(session(root / "onnx"), feed, root / "onnx" / "adapters" / "gamma.onnx_adapter")
    mask = feed["attention_mask"]
    np.testing.assert_allclose(real(got, mask, "llama"), real(expected.numpy(), mask, "llama"), atol=1e-4, rtol=0)

    again = cli_run("onnx-adapter", tmp_path / "gamma", "--for", root / "onnx")
    assert_refused(again, "gamma.onnx_adapter", "--force")
    assert cli_run("onnx-adapter", tmp_path / "gamma", "--for", root / "onnx", "--force").exit_code == 0
    assert not [p for p in (root / "onnx" / "adapters").iterdir() if p.name.startswith(".")]  # no scratch left


@pytest.mark.parametrize("change, message", [
    (dict(target_modules=["v_proj", "down_proj"], feedforward_modules=[]), "feedforward_modules differ"),
    (dict(target_modules=["q_proj"], feedforward_modules=[]), "q_proj"),
])
def test_onnx_adapter_refuses_a_vector_without_a_matching_slot(exported, tmp_path, change, message):
    root = exported("llama")[0]
    add_ia3(build_model("llama"), "llama", seed=5, **change).save_pretrained(tmp_path / "odd")
    before = sorted(p.name for p in (root / "onnx" / "adapters").iterdir())
    assert_refused(cli_run("onnx-adapter", tmp_path / "odd", "--for", root / "onnx"), tmp_path / "odd", message)
    assert sorted(p.name for p in (root / "onnx" / "adapters").iterdir()) == before


def test_onnx_adapter_refuses_a_different_model_size(exported, tmp_path):
    root = exported("llama")[0]
    add_ia3(build_model("llama", hidden_size=48), "llama", seed=5).save_pretrained(tmp_path / "wide")
    assert_refused(cli_run("onnx-adapter", tmp_path / "wide", "--for", root / "onnx"), tmp_path / "wide")


def test_onnx_adapter_refuses_an_export_without_slots(tmp_path):
    """A graph without the slots' metadata (what a plain export writes: see test_export_onnx)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (tmp_path / "plain").mkdir()
    onnx.save(helper.make_model(graph), str(tmp_path / "plain" / "model.onnx"))
    line = assert_refused(cli_run("onnx-adapter", FIXTURES / "llama" / "adapter", "--for", tmp_path / "plain"),
                          tmp_path / "plain" / "model.onnx", "--runtime-adapters")
    assert "no runtime adapter slots" in line
    assert_refused(cli_run("onnx-adapter", FIXTURES / "llama" / "adapter", "--for", tmp_path), "no model.onnx")
    failed = cli_run("onnx-adapter", FIXTURES / "llama" / "adapter", "--for", tmp_path, "--json")
    assert envelope(failed, "onnx-adapter", False)["error"]["code"] == "export"


def test_export_refusals_leave_nothing(tmp_path):
    base, adapters = make_setup(tmp_path, "llama")
    out = tmp_path / "onnx"
    add_ia3(build_model("llama"), "llama", seed=3, modules_to_save=["lm_head"]).save_pretrained(tmp_path / "headed")
    assert_refused(cli_run("export-onnx", base, "-o", out, "--runtime-adapters", tmp_path / "headed"),
                   tmp_path / "headed", "modules_to_save", out=out)
    add_ia3(build_model("llama"), "llama", seed=3, feedforward_modules=[]).save_pretrained(tmp_path / "outputs")
    assert_refused(cli_run("export-onnx", base, "-o", out, "--runtime-adapters", adapters[0], tmp_path / "outputs"),
                   tmp_path / "outputs", "down_proj", out=out)  # alpha scales down_proj's inputs, this its outputs
    (tmp_path / "other").mkdir()
    add_ia3(build_model("llama"), "llama", seed=4).save_pretrained(tmp_path / "other" / "alpha")
    assert_refused(cli_run("export-onnx", base, "-o", out, "--runtime-adapters", adapters[0],
                           tmp_path / "other" / "alpha"), "alpha", out=out, code=2)
    for flags in (["--with-past"], ["--dtype", "fp16"], ["--quantize", "int8"], ["--adapter", adapters[0]]):
        result = cli_run("export-onnx", base, "-o", out, "--runtime-adapters", adapters[0], *flags)
        assert result.exit_code == 2 and "--runtime-adapters" in result.output, (flags, result.output)
    assert not out.exists()


def test_runtime_adapters_take_several_values_or_repeat(monkeypatch, tmp_path):
    import ia3tools

    seen = []
    monkeypatch.setattr(ia3tools, "export_onnx", lambda model, out, options, **kw: seen.append(options) or exit(0))
    cli_run("export-onnx", "base", "-o", tmp_path / "x", "--runtime-adapters", "a", "b", "c", "--opset", "17")
    cli_run("export-onnx", "base", "--runtime-adapters", "a", "--runtime-adapters", "b", "-o", tmp_path / "x")
    assert [o.runtime_adapters for o in seen] == [("a", "b", "c"), ("a", "b")] and seen[0].opset == 17


def test_a_wrong_adapter_file_fails_the_switching_parity_and_publishes_nothing(tmp_path, monkeypatch):
    """Fault injected: alpha's file holds its vectors times 1.5. The parity run with alpha active
    must catch it (the base run alone would pass), and nothing is published."""
    import ia3tools.exporting.runtime as runtime

    base, adapters = make_setup(tmp_path, "llama")
    honest = runtime.write_adapter_file

    def skewed(path, values):
        honest(path, {k: v * 1.5 for k, v in values.items()} if path.name.startswith("alpha") else values)

    monkeypatch.setattr(runtime, "write_adapter_file", skewed)
    out = tmp_path / "onnx"
    line = assert_refused(cli_run("export-onnx", base, "-o", out, "-q", "--runtime-adapters", *adapters), out, out=out)
    assert "runtime adapter alpha active" in line and "exceeds --atol" in line


def test_onnx_adapter_that_onnxruntime_refuses_leaves_nothing(exported, tmp_path, monkeypatch):
    import ia3tools.exporting.runtime as runtime

    root = exported("llama")[0]
    add_ia3(build_model("llama"), "llama", seed=31).save_pretrained(tmp_path / "delta")
    monkeypatch.setattr(runtime, "write_adapter_file", lambda path, values: path.write_bytes(b"not an adapter"))
    before = sorted(p.name for p in (root / "onnx" / "adapters").iterdir())
    line = assert_refused(cli_run("onnx-adapter", tmp_path / "delta", "--for", root / "onnx"), tmp_path / "delta")
    assert "onnxruntime refuses the adapter" in line
    assert sorted(p.name for p in (root / "onnx" / "adapters").iterdir()) == before


def test_conv_channels_scale_as_peft_does(tmp_path):
    """A ResNet: Conv2d slots on output channels (bias-free convs, then batch norm) and on input
    channels, against PEFT with real pixels."""
    build_model("resnet").save_pretrained(tmp_path / "base")
    add_ia3(build_model("resnet"), "resnet", seed=3).save_pretrained(tmp_path / "conv")
    out = tmp_path / "onnx"
    report = envelope(cli_run("export-onnx", tmp_path / "base", "-o", out, "--runtime-adapters", tmp_path / "conv",
                              "--json", "-q"), "export-onnx", True)
    assert {s["scales"] for s in report["slots"]} == {"outputs", "inputs"}
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_peft(tmp_path / "base", tmp_path / "conv")(pixel_values=pixels).logits.numpy()
    got = run_with(session(out), {"pixel_values": pixels.numpy()}, out / "adapters" / "conv.onnx_adapter")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected - run_with(session(out), {"pixel_values": pixels.numpy()})).max() > 1e-3
