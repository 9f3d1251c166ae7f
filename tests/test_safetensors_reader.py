import struct

import numpy as np
import pytest
from conftest import st_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from ia3tools.errors import FormatError, Ia3Error
from ia3tools.formats.safetensors import SafetensorsFile, parse_header_bytes, read_header

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write(tmp_path, content: bytes, name="x.safetensors"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def error_of(tmp_path, content: bytes) -> str:
    with pytest.raises(FormatError) as exc:
        read_header(write(tmp_path, content))
    return str(exc.value)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    import ml_dtypes

    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.25], dtype=np.float16),
        "c": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "bf": np.array([1.0, 3.140625, -0.5], dtype=ml_dtypes.bfloat16),
    }
    save_file({k: v for k, v in arrays.items() if k != "bf"}, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"k": "v"}
    for name, expected in arrays.items():
        if name == "bf":
            continue
        got = f.array(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert f.read_bytes("a", 4, 8) == arrays["a"].tobytes()[4:12]


def test_reads_bf16_written_by_torch(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    t = torch.tensor([1.0, 3.140625, -0.5, 65280.0], dtype=torch.bfloat16)
    save_torch({"t": t}, str(tmp_path / "x.safetensors"))
    got = SafetensorsFile(tmp_path / "x.safetensors").array("t")
    np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02", "file is 2 bytes, shorter than the 8-byte header length"),
        (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "header length 209715200 exceeds the 100 MB limit"),
        (struct.pack("<Q", 50) + b"{}", "header length 50 runs past the end of the file"),
        (st_bytes(b"\xff\xfe{}"), "header is not valid UTF-8"),
        (st_bytes(b'{"a": 1'), "header is not valid JSON"),
        (st_bytes(b"{}\x00\x00\x00"), "header contains NUL bytes (only spaces may pad it)"),
        (st_bytes(b"[1, 2]"), "header is not a JSON object"),
        (st_bytes(b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                  b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'), "duplicate key 'a' in header"),
        (st_bytes({"__metadata__": {"k": 1}}), "__metadata__ value for 'k' is not a string"),
        (st_bytes({"__metadata__": ["x"]}), "__metadata__ is not an object"),
        (st_bytes({"t": {**F32, "dtype": "F99"}}, b"\0" * 8), "tensor 't': unknown dtype 'F99'"),
        (st_bytes({"t": {**F32, "shape": [-2]}}, b"\0" * 8), "tensor 't': shape is not a list of non-negative"),
        (st_bytes({"t": {**F32, "shape": [True]}}, b"\0" * 8), "tensor 't': shape is not a list of non-negative"),
        (st_bytes({"t": {**F32, "shape": [3]}}, b"\0" * 8), "tensor 't': shape [3] x F32 is 12 bytes but data_offsets span 8"),
        (st_bytes({"t": {**F32, "shape": [2**40, 2**40]}}, b"\0" * 8), "is 4835703278458516698824704 bytes"),
        (st_bytes({"t": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8), "data_offsets end before they begin"),
        (st_bytes({"t": {**F32, "extra": 1}}, b"\0" * 8), "needs exactly dtype, shape and data_offsets"),
        (st_bytes({"t": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12), "tensor 't': data offsets leave a gap at byte 0"),
        (st_bytes({"t": F32, "u": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12), "leave an overlap at byte 8"),
        (st_bytes({"t": F32}, b"\0" * 12), "4 trailing bytes after the last tensor"),
        (st_bytes({"t": F32}, b"\0" * 5), "data is truncated: header needs 8 bytes, file has 5"),
        (st_bytes({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, b"\0"), "does not fill whole bytes of F4"),
        (st_bytes(b'{"t": NaN}'), "header is not valid JSON (NaN is not valid JSON"),
        (st_bytes(b"[" * 100000 + b"]" * 100000), "header is not a JSON object"),
        (st_bytes(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"), "header is nested too deeply"),
    ],
)
def test_malformed_files_are_named_errors(tmp_path, content, message):
    msg = error_of(tmp_path, content)
    assert msg.startswith(str(tmp_path / "x.safetensors") + ": ")
    assert message in msg


def test_space_padding_is_allowed(tmp_path):
    header = read_header(write(tmp_path, st_bytes(b'{"t": ' + __import__("json").dumps(F32).encode() + b"}    ",
                                                  b"\0" * 8)))
    assert list(header.tensors) == ["t"]


def test_fifo_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(FormatError, match="not a regular file"):
        read_header(tmp_path / "pipe.safetensors")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), extra=st.integers(min_value=0, max_value=64))
def test_fuzz_header_parser_only_raises_typed_errors(tmp_path, raw, extra):
    try:
        parse_header_bytes(raw, 8 + len(raw) + extra, tmp_path / "f")
    except Ia3Error:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path, data):
    good = bytearray(st_bytes({"__metadata__": {"format": "pt"}, "t": F32, "u": {**F32, "data_offsets": [8, 16]}},
                              b"\1" * 16))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(good[:cut]))
    try:
        read_header(path)
    except Ia3Error:
        pass
