"""ONNX export: each exported model runs in onnxruntime and matches the torch model."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES
from peft_oracle import load_peft
from test_schema import envelope

from ia3tools.cli import cli
from ia3tools.publish import MARK as STAGING_MARK


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ort_logits(onnx_dir, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def data_locations(onnx_dir):
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


def test_llama_merged_dir_exports_and_runs_after_a_move(tmp_path):
    merged, out = tmp_path / "merged", tmp_path / "onnx"
    assert run("merge", FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", "-o", merged, "-q").exit_code == 0
    report = envelope(run("export-onnx", merged, "-o", out, "--json"), "export-onnx", True)  # valid against the schema
    assert report["task"] == "text-generation" and report["parity"]["passed"] and report["timings"]["export_s"] > 0
    assert report["parity"]["outputs"]["logits"]["max_abs"] <= 1e-4
    assert set(report["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json"}
    assert data_locations(out) == {"model.onnx.data"}
    import onnx

    exported = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert exported.graph.node and not any(n.metadata_props for n in exported.graph.node)  # no debug paths
    assert report["slots"] == [] and not any(p.key == "ia3tools.slots" for p in exported.metadata_props)
    moved = tmp_path / "elsewhere" / "deployed"
    moved.parent.mkdir()
    shutil.move(out, moved)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (4, 9))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = model(**feeds).logits.numpy()
    np.testing.assert_allclose(ort_logits(moved, feeds), expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bert-cls", "t5"])
def test_base_plus_adapter_exports_with_parity(tiny_pair, tmp_path, arch):
    if arch == "t5":
        base, adapter = tiny_pair("t5")
    else:
        base, adapter = FIXTURES / arch / "base", FIXTURES / arch / "adapter"
    out = tmp_path / "onnx"
    result = run("export-onnx", base, "--adapter", adapter, "-o", out)
    assert result.exit_code == 0, result.output
    expected_task = {"gpt2": "text-generation", "bert-cls": "text-classification", "t5": "text2text-generation"}[arch]
    assert f"exported {expected_task} -> {out}" in result.output
    assert not [p for p in tmp_path.iterdir() if STAGING_MARK in p.name]
    # independent check against the adapted PEFT model itself, on other inputs
    peft_model = load_peft(base, adapter, "BertForSequenceClassification" if arch == "bert-cls" else None)
    ids = torch.randint(0, 128, (2, 6))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        feeds["decoder_input_ids"] = torch.randint(0, 128, (2, 3))
    if arch == "bert-cls":  # no tokenizer here: BERT's segment embeddings make token_type_ids an input
        feeds["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = peft_model(**feeds).logits.numpy()
    np.testing.assert_allclose(ort_logits(out, feeds), expected, atol=1e-4, rtol=1e-4)


def test_image_classification_without_parity(tiny_pair, tmp_path):
    base, adapter = tiny_pair("resnet")
    out = tmp_path / "onnx"
    result = run("export-onnx", base, "--adapter", adapter, "-o", out, "--task", "image-classification",
                 "--no-parity", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"] is None
    peft_model = load_peft(base, adapter)
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = peft_model(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(ort_logits(out, {"pixel_values": pixels}), expected, atol=1e-4, rtol=1e-4)


def test_corrupted_export_fails_parity_and_publishes_nothing(tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from ia3tools.exporting import graph as export

    original = export.write_model

    def corrupt(ir_model, path):
        original(ir_model, path)
        model = onnx.load(str(path))
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")

    monkeypatch.setattr(export, "write_model", corrupt)
    out = tmp_path / "onnx"
    result = run("export-onnx", FIXTURES / "gpt2" / "base", "--adapter", FIXTURES / "gpt2" / "adapter", "-o", out)
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith(f"Error: {out}: parity check failed: max abs error")
    assert "exceeds --atol 0.0001; nothing was published" in error[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_task_errors(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "gpt2" / "base", model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["Mystery"]
    (model / "config.json").write_text(json.dumps(config))
    result = run("export-onnx", model, "-o", tmp_path / "o")
    assert result.exit_code == 1
    assert result.output == f"Error: {model}: cannot tell the task (architectures: Mystery); pass --task\n"
    assert run("export-onnx", model, "-o", tmp_path / "o", "--task", "translation").exit_code == 2
    assert run("export-onnx", model, "-o", tmp_path / "o", "--opset", "7").exit_code == 2


def test_scattered_external_data_is_gathered_into_one_file(tmp_path):
    """The TorchScript fallback may write one file per weight; the export keeps one data file."""
    import onnx

    from ia3tools.exporting.graph import tidy as _tidy
    from ia3tools.exporting.graph import validate_export
    from ia3tools.exporting.parity import run_onnx

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(2, 64)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False)
    assert len(list(tmp_path.iterdir())) > 2
    _tidy(path)
    validate_export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, {"x": x.numpy()})[0], model(x).numpy(), atol=1e-6)


def test_onnxruntime_rejecting_the_export_is_one_line_and_publishes_nothing(tmp_path):
    """At opset 23 the exporter fuses Llama's rotary embedding into an op onnxruntime rejects."""
    merged, out = tmp_path / "merged", tmp_path / "onnx"
    assert run("merge", FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", "-o", merged, "-q").exit_code == 0
    result = run("export-onnx", merged, "-o", out, "--opset", "23")
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: {out}: onnxruntime cannot run the export: ")
    assert error.endswith("; try --opset 18; nothing was published") and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or reach a host is recorded and refused."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_an_adapter_kept_beside_merged_weights_is_never_applied_again(tmp_path, no_network):
    """transformers re-applies an adapter it finds beside the weights; the export must hold exactly
    the weights in the directory, and its parity reference must not be double-adapted either."""
    from transformers import LlamaForCausalLM

    llama = FIXTURES / "llama"
    merged, out = tmp_path / "merged", tmp_path / "onnx"
    assert run("merge", llama / "base", llama / "adapter", "-o", merged, "-q").exit_code == 0
    weights_only = tmp_path / "weights-only"
    shutil.copytree(merged, weights_only)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(llama / "adapter" / name, merged / name)
    result = run("export-onnx", merged, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert [w["code"] for w in warnings] == ["adapter-ignored"]
    assert "adapter_config.json, adapter_model.safetensors: ignored" in warnings[0]["message"]
    assert result.stderr.count("warning: ") == 1  # warnings go to stderr with --json too
    assert not any(name.startswith("adapter_") for name in os.listdir(out))
    ids = torch.randint(3, 128, (2, 7))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(weights_only, dtype=torch.float32).eval()(**feeds).logits.numpy()
        doubled = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(**feeds).logits.numpy()
    got = ort_logits(out, feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(doubled - expected).max() > 1e-2  # what the export would hold if it re-applied the adapter
    assert no_network == []


def test_an_adapter_directory_is_refused_without_touching_the_network(tmp_path, no_network):
    out = tmp_path / "onnx"
    adapter = FIXTURES / "llama" / "adapter"
    result = run("export-onnx", adapter, "-o", out, "--task", "causal-lm")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {adapter}: this is an adapter directory, not a base checkpoint\n"
    assert no_network == [] and not out.exists()
