"""Hostile inputs, second round, at the file level: special files, symlink loops, strict JSON
everywhere, errors that blame the right file, one-line messages for hostile names, and a base
that keeps an adapter beside its weights. Every case goes through the command line: exit 1,
exactly one stderr line naming the input, nothing at OUT, no staging left (``assert_refused``)."""

import json
import os
import shutil
import socket

import pytest
from conftest import FIXTURES, assert_refused, cli_run, edit_json

INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-00002.safetensors"

pytestmark = pytest.mark.timeout(60)  # a FIFO opened for reading would block forever


def merge(base, adapter, out, *more):
    return cli_run("merge", base, adapter, "-o", out, "-q", *more)


def make_fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


# --- special files: never opened, never followed to ------------------------------------------

@pytest.mark.parametrize("where, name, kind", [
    ("adapter", "adapter_config.json", "a FIFO"),
    ("adapter", "adapter_model.safetensors", "a FIFO"),
    ("base", "config.json", "a FIFO"),
    ("base", INDEX, "a FIFO"),
    ("base", SHARD2, "a FIFO"),
    ("base", "tokenizer.json", "a FIFO"),
    ("base", "config.json", "a directory"),
])
def test_special_files_are_refused_without_blocking(fixture_copy, tmp_path, where, name, kind):
    base, adapter = fixture_copy("llama")
    target = (base if where == "base" else adapter) / name
    if kind == "a FIFO":
        make_fifo(target)
    else:
        target.unlink()
        target.mkdir()
    out = tmp_path / "out"
    line = assert_refused(merge(base, adapter, out), target, out=out)
    assert f"is {kind}, not a regular file" in line


def test_a_symlink_to_a_fifo_is_not_followed(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    os.mkfifo(base / "fifo")
    (base / SHARD2).unlink()
    (base / SHARD2).symlink_to("fifo")
    out = tmp_path / "out"
    assert "is a FIFO, not a regular file" in assert_refused(merge(base, adapter, out), base / SHARD2, out=out)


def test_a_socket_as_a_shard(fixture_copy, tmp_path, monkeypatch):
    base, adapter = fixture_copy("llama")
    (base / SHARD2).unlink()
    monkeypatch.chdir(base)  # a relative bind: socket paths are limited to about 100 bytes
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(SHARD2)
    try:
        out = tmp_path / "out"
        assert "is a socket, not a regular file" in assert_refused(merge(base, adapter, out), base / SHARD2, out=out)
    finally:
        sock.close()


def test_special_files_for_every_command(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    assert cli_run("merge", base, adapter, "-o", tmp_path / "merged", "-q").exit_code == 0
    make_fifo(adapter / "adapter_config.json")
    assert_refused(cli_run("check", base, adapter), adapter / "adapter_config.json")
    assert_refused(cli_run("inspect", adapter / "adapter_config.json"), adapter / "adapter_config.json")
    make_fifo(tmp_path / "merged" / SHARD2)
    assert_refused(cli_run("verify", base, FIXTURES / "llama" / "adapter", tmp_path / "merged"),
                   tmp_path / "merged" / SHARD2)
    make_fifo(tmp_path / "merged" / "config.json")
    out = tmp_path / "onnx"
    assert_refused(cli_run("export-onnx", tmp_path / "merged", "-o", out), out=out)


# --- symlink loops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["base", "adapter", "shard", "config.json", "adapter_config.json"])
def test_symlink_loops_in_inputs(fixture_copy, tmp_path, what):
    base, adapter = fixture_copy("llama")
    if what in ("base", "adapter"):
        loop = tmp_path / f"{what}-loop"
        loop.symlink_to(loop)
        base, adapter = (loop, adapter) if what == "base" else (base, loop)
        named = loop
    else:
        named = {"shard": base / SHARD2, "config.json": base / "config.json",
                 "adapter_config.json": adapter / "adapter_config.json"}[what]
        named.unlink()
        named.symlink_to(named.name)
    out = tmp_path / "out"
    line = assert_refused(merge(base, adapter, out), out=out)
    assert "symbolic link loop" in line and (str(named) in line or f"'{named.name}'" in line), line


# --- strict JSON everywhere -------------------------------------------------------------------------

def bare_bert(tmp_path):
    base = tmp_path / "bert" / "base"
    shutil.copytree(FIXTURES / "bert-cls", tmp_path / "bert")
    return base, tmp_path / "bert" / "adapter"


@pytest.mark.parametrize("text, message", [
    ('{"architectures": ["BertModel"], "architectures": ["X"]}', "duplicate key 'architectures' in model config"),
    ('{"architectures": ["BertModel"], "layer_norm_eps": NaN}', "NaN is not valid JSON"),
    ('{"architectures": "BertModel"}', "architectures must be a list of strings"),
    ('{"architectures": [["BertModel"]]}', "architectures must be a list of strings"),
    ('["BertModel"]', "model config is not a JSON object"),
])
def test_the_base_config_is_read_strictly(tmp_path, text, message):
    base, adapter = bare_bert(tmp_path)  # the config is retargeted to the task head
    (base / "config.json").write_text(text)
    out = tmp_path / "out"
    assert message in assert_refused(merge(base, adapter, out), base / "config.json", out=out)


@pytest.mark.parametrize("change, message, tensor", [
    (lambda doc: doc["weight_map"].update({"model.norm.weight": ["model-00001-of-00002.safetensors"]}),
     "weight_map value is list, not a shard file name", "model.norm.weight"),
    (lambda doc: doc["weight_map"].update({"model.norm.weight": 7}), "weight_map value is int", "model.norm.weight"),
    (lambda doc: doc["metadata"].update({"total_size": "many"}), "total_size is not an integer", None),
])
def test_index_values_are_typed(fixture_copy, tmp_path, change, message, tensor):
    base, adapter = fixture_copy("llama")
    doc = json.loads((base / INDEX).read_text())
    change(doc)
    (base / INDEX).write_text(json.dumps(doc))
    out = tmp_path / "out"
    line = assert_refused(merge(base, adapter, out), base / INDEX, *([f"tensor '{tensor}'"] if tensor else []), out=out)
    assert message in line


def test_the_config_read_by_export_is_strict(fixture_copy, tmp_path):
    base, _ = fixture_copy("llama")
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "architectures": []}')
    out = tmp_path / "onnx"
    line = assert_refused(cli_run("export-onnx", base, "-o", out), base / "config.json", out=out)
    assert "duplicate key 'architectures' in model config" in line


# --- blame the right file -----------------------------------------------------------------------------

def shrink_after_planning(monkeypatch, module, path):
    """Truncate ``path`` right after the run has opened and planned its inputs."""
    real = module.assemble

    def assemble_then_shrink(*args, **kwargs):
        result = real(*args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return result

    monkeypatch.setattr(module, "assemble", assemble_then_shrink)


@pytest.mark.parametrize("shard", ["model-00001-of-00002.safetensors", SHARD2])
def test_an_input_that_shrinks_mid_merge_is_named(fixture_copy, tmp_path, monkeypatch, shard):
    from ia3tools.commands import merge as merge_module

    base, adapter = fixture_copy("llama")
    shrink_after_planning(monkeypatch, merge_module, base / shard)
    out = tmp_path / "out"
    line = assert_refused(merge(base, adapter, out), base / shard, out=out)
    assert "file shrank while being read" in line and "cannot write the output" not in line


def test_an_input_that_shrinks_mid_verify_is_named(fixture_copy, tmp_path, monkeypatch):
    from ia3tools.commands import verify as verify_module

    base, adapter = fixture_copy("llama")
    assert merge(base, adapter, tmp_path / "merged").exit_code == 0
    shrink_after_planning(monkeypatch, verify_module, base / SHARD2)
    assert "file shrank while being read" in assert_refused(cli_run("verify", base, adapter, tmp_path / "merged"),
                                                            base / SHARD2)


def test_an_input_replaced_mid_run_is_read_as_it_was_validated(fixture_copy, tmp_path, monkeypatch):
    from ia3tools.commands import merge as merge_module

    base, adapter = fixture_copy("llama")
    original = tmp_path / "original"
    shutil.copytree(base, original)
    real = merge_module.assemble

    def assemble_then_replace(*args, **kwargs):
        result = real(*args, **kwargs)
        (base / "other").write_bytes((FIXTURES / "gpt2" / "base" / "model.safetensors").read_bytes())
        os.replace(base / "other", base / SHARD2)
        return result

    monkeypatch.setattr(merge_module, "assemble", assemble_then_replace)
    assert merge(base, adapter, tmp_path / "merged").exit_code == 0
    monkeypatch.undo()
    assert cli_run("verify", original, adapter, tmp_path / "merged").exit_code == 0


def test_a_bin_truncated_after_it_was_opened_is_named_not_sigbus(tmp_path, monkeypatch):
    import torch

    from ia3tools.commands import merge as merge_module

    base, adapter = tmp_path / "base", FIXTURES / "llama" / "adapter"
    base.mkdir()
    from safetensors.torch import load_file

    state = {}
    for shard in ("model-00001-of-00002.safetensors", SHARD2):
        state.update(load_file(FIXTURES / "llama" / "base" / shard))
    torch.save(state, base / "pytorch_model.bin")
    shrink_after_planning(monkeypatch, merge_module, base / "pytorch_model.bin")
    out = tmp_path / "out"
    assert "file shrank while being read" in assert_refused(merge(base, adapter, out), base / "pytorch_model.bin",
                                                            out=out)


# --- one line means one line ------------------------------------------------------------------------

def test_control_characters_in_names_are_escaped(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    hostile = tmp_path / "evil\nError: forged\x1b[31m"
    shutil.copytree(adapter, hostile)
    edit_json(hostile / "adapter_config.json", peft_type="LORA")
    line = assert_refused(merge(base, hostile, tmp_path / "out"))
    assert "evil\\nError: forged\\x1b[31m" in line
    out = tmp_path / "out\nx"
    (out).mkdir()
    assert "out\\nx: output already exists" in assert_refused(merge(base, adapter, out))


def test_control_characters_in_tensor_names_are_escaped(tmp_path):
    from make_bad import CONFIG, base_tensors, f32, safetensors_bytes, write_pair

    vectors = [("base_model.model.layer.q\nforged.ia3_l", "F32", [4, 1], f32([[1.5]] * 4))]
    base, adapter = write_pair(tmp_path / "pair", base=safetensors_bytes(base_tensors()),
                               adapter=safetensors_bytes(vectors), config={**CONFIG, "target_modules": r".*"})
    line = assert_refused(merge(base, adapter, tmp_path / "out"), out=tmp_path / "out")
    assert "layer.q\\nforged" in line


# --- a base that keeps an adapter beside its weights --------------------------------------------------

def test_a_base_holding_an_adapter_config_merges_by_content(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, base / name)
    out = tmp_path / "merged"
    result = merge(base, adapter, out)
    assert result.exit_code == 0, result.output
    assert not any(n.startswith("adapter_") for n in os.listdir(out))
    assert cli_run("verify", base, adapter, out).exit_code == 0
    inspected = cli_run("inspect", base, "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["kind"] == "checkpoint"
