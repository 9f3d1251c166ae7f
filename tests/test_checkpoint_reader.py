import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES, st_bytes

from ia3tools.errors import FormatError
from ia3tools.formats import open_checkpoint

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def sharded(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "llama" / "base", d)
    return d, d / "model.safetensors.index.json"


def set_index(index, **weight_map_changes):
    doc = json.loads(index.read_text())
    for k, v in weight_map_changes.items():
        if v is None:
            doc["weight_map"].pop(k)
        else:
            doc["weight_map"][k] = v
    index.write_text(json.dumps(doc))


def test_sharded_fixture_matches_safetensors_library():
    from safetensors import safe_open

    ckpt = open_checkpoint(FIXTURES / "llama" / "base")
    assert ckpt.sharded and ckpt.format == "safetensors" and len(ckpt.files) == 2
    index = json.loads((FIXTURES / "llama" / "base" / "model.safetensors.index.json").read_text())
    assert set(ckpt.tensors) == set(index["weight_map"])
    for name, shard in index["weight_map"].items():
        with safe_open(FIXTURES / "llama" / "base" / shard, "pt") as f:
            expected = f.get_tensor(name).float().numpy()
        np.testing.assert_array_equal(ckpt.array(name).astype(np.float32), expected)
    assert ckpt.warnings == []


@pytest.mark.parametrize(
    "shard, message",
    [
        ("/etc/passwd", "shard name '/etc/passwd' is not a plain file name"),
        ("../model-00001-of-00002.safetensors", "is not a plain file name"),
        ("sub/model.safetensors", "shard name 'sub/model.safetensors' is not a plain file name"),
        ("..", "shard name '..' is not a plain file name"),
        ("pytorch_model.bin", "safetensors index names shard 'pytorch_model.bin', which is not a .safetensors file"),
        ("model-00009-of-00009.safetensors", "shard 'model-00009-of-00009.safetensors' named in the index is missing"),
    ],
)
def test_index_shard_names(tmp_path, shard, message):
    d, index = sharded(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"x")
    set_index(index, **{"model.norm.weight": shard})
    with pytest.raises(FormatError) as exc:
        open_checkpoint(d)
    assert str(exc.value) == f"{index}: {message}" or message in str(exc.value)


def test_symlinked_shard_out_of_directory_is_refused(tmp_path):
    d, index = sharded(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(d / "model-00002-of-00002.safetensors", outside)
    os.symlink(outside, d / "model-00002-of-00002.safetensors")
    with pytest.raises(FormatError, match="shard 'model-00002-of-00002.safetensors' resolves outside the directory"):
        open_checkpoint(d)


def test_fifo_shard_is_refused(tmp_path):
    d, index = sharded(tmp_path)
    os.remove(d / "model-00002-of-00002.safetensors")
    os.mkfifo(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FormatError, match="model-00002-of-00002.safetensors: safetensors file is a FIFO, not a regular file"):
        open_checkpoint(d)


def test_tensor_missing_from_its_shard(tmp_path):
    d, index = sharded(tmp_path)
    set_index(index, **{"ghost.weight": "model-00001-of-00002.safetensors"})
    with pytest.raises(FormatError) as exc:
        open_checkpoint(d)
    assert str(exc.value) == (f"{index}: tensor 'ghost.weight': index places the tensor in "
                              "'model-00001-of-00002.safetensors', but that shard lacks it")


def test_tensor_in_shard_but_not_in_index(tmp_path):
    d, index = sharded(tmp_path)
    set_index(index, **{"model.norm.weight": None})
    with pytest.raises(FormatError, match="tensor 'model.norm.weight': tensor is in the shard but not in the index"):
        open_checkpoint(d)


def test_tensor_in_two_shards(tmp_path):
    d, index = sharded(tmp_path)
    doc = json.loads(index.read_text())
    name, shard = next(iter(doc["weight_map"].items()))
    other = next(s for s in set(doc["weight_map"].values()) if s != shard)
    set_index(index, **{name: other})
    with pytest.raises(FormatError, match=f"tensor '{name}'"):
        open_checkpoint(d)


def test_duplicate_weight_map_key(tmp_path):
    d, index = sharded(tmp_path)
    text = index.read_text().replace('"weight_map": {', '"weight_map": {"lm_head.weight": "x.safetensors", ', 1)
    index.write_text(text)
    with pytest.raises(FormatError, match="duplicate key 'lm_head.weight' in index"):
        open_checkpoint(d)


def test_stray_shard_not_in_index(tmp_path):
    d, index = sharded(tmp_path)
    (d / "model-00003-of-00003.safetensors").write_bytes(st_bytes({}))
    with pytest.raises(FormatError, match="shard file 'model-00003-of-00003.safetensors' is present but not named"):
        open_checkpoint(d)


def test_total_size_mismatch_is_a_warning(tmp_path):
    d, index = sharded(tmp_path)
    doc = json.loads(index.read_text())
    doc["metadata"]["total_size"] = 1
    index.write_text(json.dumps(doc))
    ckpt = open_checkpoint(d)
    assert [w.message for w in ckpt.warnings] == [f"{index}: index total_size 1 disagrees with the shards' 53568 bytes"]


def test_empty_directory_and_adapter_directory(tmp_path):
    with pytest.raises(FormatError, match="no weights found"):
        open_checkpoint(tmp_path)
    with pytest.raises(FormatError, match="this is an adapter directory, not a base checkpoint"):
        open_checkpoint(FIXTURES / "llama" / "adapter")


def test_bin_checkpoint_reads_like_torch(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "i": torch.arange(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "bin" and [r.dtype for r in ckpt.tensors.values()] == ["F32", "BF16", "I64"]
    for name, t in state.items():
        np.testing.assert_array_equal(ckpt.array(name).astype(np.float64), t.double().numpy())


def test_sharded_bin_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.sharded and list(ckpt.tensors) == ["a", "b"]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pytorch_model.bin: refused by weights-only unpickling"):
        open_checkpoint(tmp_path)
    assert not marker.exists()


def test_torch_version_floor():
    from ia3tools.formats.pickled import _torch_version_ok

    assert _torch_version_ok("2.6.0") and _torch_version_ok("2.13.0+cpu") and _torch_version_ok("3.0")
    assert not _torch_version_ok("2.5.1") and not _torch_version_ok("1.13") and not _torch_version_ok("junk")


def test_bin_byte_ranges_match_the_tensor_bytes(tmp_path):
    state = {"w": torch.randn(5, 7).to(torch.bfloat16), "b": torch.tensor([True, False]), "s": torch.tensor(3.5)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    reader = ckpt.reader("w")
    whole = state["w"].view(torch.int16).numpy().tobytes()
    assert reader.read_bytes("w") == whole and reader.read_bytes("w", 14, 28) == whole[14:42]
    assert reader.read_bytes("b") == b"\x01\x00" and reader.read_bytes("s") == np.float32(3.5).tobytes()
