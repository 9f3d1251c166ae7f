"""ONNX for generation and small deployments: --with-past (a KV cache in optimum's convention),
--dtype fp16 and --quantize int8, each alone and combined, with the Llama and GPT-2 fixtures.
The references are transformers itself: the model with its own cache, and ``generate``."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURES, ROOT, cli_run


ARCHS = ["llama", "gpt2"]


def session(directory):
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def export(tmp_path_factory, arch, *options, base=None):
    out = tmp_path_factory.mktemp(arch) / "onnx"
    result = cli_run("export-onnx", base or FIXTURES / arch / "base", "-o", out, "--json", "-q", *options)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module", params=ARCHS)
def with_past(request, tmp_path_factory):
    out, report = export(tmp_path_factory, request.param, "--with-past")
    return request.param, out, report


def test_the_convention_and_the_generation_parity(with_past):
    arch, out, report = with_past
    layers = 2
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    sess = session(out)
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask", "position_ids", *past]  # both take position_ids
    assert [o.name for o in sess.get_outputs()] == ["logits"] + [n.replace("past_key_values", "present") for n in past]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["attention_mask"] == ["batch", "attention_sequence"]
    assert shapes[past[0]][0] == "batch" and shapes[past[0]][2] == "past_sequence"
    assert report["with_past"] and report["parity"]["passed"]
    generation = report["parity"]["generation"]
    assert generation == {"batch": 2, "prompt": 5, "new_tokens": 16, "tokens_equal": True, "steps_top1": 1.0}
    assert report["parity"]["outputs"]["logits"]["max_abs"] <= 1e-4
    assert len(list(out.glob("*.onnx"))) == 1 and (out / "model.onnx.data").exists()


@pytest.mark.parametrize("batch", [2, 3])
def test_every_past_length_from_0_to_20_against_transformers_cache(with_past, batch):
    """One step of three new tokens after a past of 0..20, onnxruntime against the torch model
    holding the same past in its own DynamicCache: logits and the present cache."""
    from transformers import AutoModelForCausalLM

    arch, out, _ = with_past
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / arch / "base", dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    sess = session(out)
    names = [i.name for i in sess.get_inputs()]
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 128, (batch, 23), generator=g)
    heads, dim = sess.get_inputs()[3].shape[1], sess.get_inputs()[3].shape[3]
    for past in range(21):
        feed = {"input_ids": ids[:, past:past + 3].numpy(), "attention_mask": np.ones((batch, past + 3), np.int64),
                "position_ids": np.tile(np.arange(past, past + 3), (batch, 1))}
        with torch.no_grad():
            cache = model(input_ids=ids[:, :past], use_cache=True).past_key_values if past else None
        for i in range(2):  # copied before the step below appends to the cache in place
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = (getattr(cache.layers[i], f"{kind}s").numpy().copy() if cache
                                                       else np.zeros((batch, heads, 0, dim), np.float32))
        with torch.no_grad():
            full = model(input_ids=ids[:, past:past + 3], past_key_values=cache, use_cache=True,
                         position_ids=torch.from_numpy(feed["position_ids"]))
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {n: feed[n] for n in names})))
        np.testing.assert_allclose(got["logits"], full.logits.numpy(), atol=1e-4, err_msg=f"past {past}")
        present = full.past_key_values.layers[1].values.numpy()
        assert got["present.1.value"].shape == present.shape == (batch, present.shape[1], past + 3, present.shape[3])
        np.testing.assert_allclose(got["present.1.value"], present, atol=1e-5)


def test_the_greedy_loop_in_the_docs_gives_generates_tokens(with_past, monkeypatch):
    """docs/export.md's greedy loop, run as written, gives exactly transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    arch, out, _ = with_past
    text = (ROOT / "docs" / "export.md").read_text()
    code = re.search(r"```python\n(# Greedy decoding.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(out.parent)
    namespace = {"prompt_ids": np.array([[0, 0, 17, 42, 99], [5, 6, 7, 8, 9]], np.int64),
                 "prompt_mask": np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)}
    exec(compile(code, "docs/export.md", "exec"), namespace)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / arch / "base", dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=torch.from_numpy(namespace["prompt_ids"]),
                                  attention_mask=torch.from_numpy(namespace["prompt_mask"]),
                                  generation_config=config)[:, 5:].numpy()
    np.testing.assert_array_equal(namespace["tokens"], expected)


# --- smaller exports ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Weight-dominated versions of the fixtures and their float32 exports, to measure size against."""
    from tiny import save_wide_model

    root = tmp_path_factory.mktemp("wide")
    models = {arch: save_wide_model(root, arch) for arch in ARCHS}
    fp32 = {arch: export(tmp_path_factory, arch, base=models[arch]) for arch in ARCHS}
    return models, fp32


def export_bytes(out):
    return sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))


def weight_initializers(out):
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    return model, inits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options, limit, top1, op", [
    (["--dtype", "fp16"], 0.6, 0.9, "Cast"),
    (["--quantize", "int8"], 0.4, 0.8, "MatMulInteger"),
    (["--quantize", "int8", "--dtype", "fp16"], 0.4, 0.8, "MatMulInteger"),
])
def test_smaller_exports_run_on_cpu_with_bounded_loss(wide, tmp_path_factory, arch, options, limit, top1, op):
    models, fp32 = wide
    out, report = export(tmp_path_factory, arch, *options, base=models[arch])
    ratio = export_bytes(out) / export_bytes(fp32[arch][0])
    assert ratio <= limit, ratio
    assert report["parity"]["passed"] and report["parity"]["outputs"]["logits"]["top1"] >= top1
    assert report["size_ratio"] < limit and report["float32_weights_bytes"] > report["weights_bytes"]
    model, inits = weight_initializers(out)
    ops = {n.op_type for n in model.graph.node}
    assert op in ops and "Gemm" not in ops or "int8" not in options
    if "int8" in options:  # every weight matrix is quantized: no float weight feeds a MatMul or Gemm
        for node in model.graph.node:
            if node.op_type in ("MatMul", "Gemm"):
                assert not any(i in inits and inits[i].data_type == onnx.TensorProto.FLOAT and len(inits[i].dims) == 2
                               for i in node.input), node.name
    assert len(list(out.glob("*.onnx"))) == 1 and (out / "model.onnx.data").exists()


@pytest.mark.parametrize("options", [["--with-past", "--dtype", "fp16"], ["--with-past", "--quantize", "int8"],
                                     ["--with-past", "--quantize", "int8", "--dtype", "fp16"]])
def test_with_past_combines_with_both(tmp_path_factory, options):
    out, report = export(tmp_path_factory, "gpt2", *options)
    assert report["parity"]["passed"] and report["parity"]["generation"]["steps_top1"] >= 0.8
    assert len(list(out.glob("*.onnx"))) == 1 and (out / "model.onnx.data").exists()
    assert "past_key_values.0.key" in [i.name for i in session(out).get_inputs()]


def test_with_past_refuses_other_tasks(tmp_path):
    result = cli_run("export-onnx", FIXTURES / "bert-cls" / "base", "-o", tmp_path / "x", "--with-past",
                     "--task", "feature-extraction")
    assert result.exit_code == 2 and "--with-past exports text-generation models" in result.stderr
