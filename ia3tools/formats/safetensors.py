"""A strict safetensors reader.

The header is parsed here rather than by the ``safetensors`` package because the released parser
accepts duplicate keys (last wins). Checks run in a fixed order, each with its own message:
length field, UTF-8, JSON, duplicate keys, metadata, per-tensor fields, dtype, byte size against
shape x dtype, and offsets contiguous from 0 covering the data region exactly.

Tensor bytes are read lazily with ``os.pread``, one tensor (or one slice of one) at a time: like a
memory map, nothing is read until asked for, but unlike one, read pages do not stay resident and
count against the process's memory.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ia3tools.errors import FormatError
from ia3tools.formats.dtypes import DTYPES, byte_size
from ia3tools.formats import files
from ia3tools.formats.files import open_regular, os_reason
from ia3tools.formats.jsonstrict import loads_strict

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. ``begin``/``end`` are offsets into the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] | None
    header_len: int  # length of the JSON header in bytes (after the 8-byte length field)
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _pread_exact(fd: int, length: int, offset: int, path: Path, what: str) -> bytes:
    chunks, got = [], 0
    while got < length:
        try:
            chunk = files.pread(fd, length - got, offset + got)
        except OSError as exc:
            raise FormatError(f"cannot read the {what}: {os_reason(exc)}", path=path) from None
        if not chunk:
            if what == "data":
                raise FormatError("file shrank while being read (it ends inside the tensor data)", path=path)
            raise FormatError(f"file ends inside the {what}", path=path)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class ByteRange:
    """Where a tensor's bytes lie in an open file, for copying them without decoding."""

    fd: int
    offset: int
    nbytes: int
    path: Path  # the file, named in errors


def parse_header_bytes(raw: bytes, file_size: int, path: Path) -> Header:
    """Validate a header given its JSON bytes and the total file size (the byte-level core,
    shared by the reader and by the fuzz tests)."""
    header_len = len(raw)
    if b"\x00" in raw:
        raise FormatError("header contains NUL bytes (only spaces may pad it)", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("header is not valid UTF-8", path=path) from None
    if not text.startswith("{"):
        raise FormatError("header is not a JSON object", path=path)
    doc = loads_strict(text, path=path, what="header")
    if not isinstance(doc, dict):
        raise FormatError("header is not a JSON object", path=path)

    metadata = doc.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise FormatError("__metadata__ is not an object", path=path)
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise FormatError(f"__metadata__ value for {key!r} is not a string", path=path)

    data_size = file_size - 8 - header_len
    tensors = [_parse_entry(name, entry, path) for name, entry in doc.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for info in tensors:
        if info.begin != expected:
            kind = "a gap" if info.begin > expected else "an overlap"
            raise FormatError(f"data offsets leave {kind} at byte {expected} of the data", path=path, tensor=info.name)
        expected = info.end
    if expected != data_size:
        if expected > data_size:
            raise FormatError(f"data is truncated: header needs {expected} bytes, file has {data_size}", path=path)
        raise FormatError(f"{data_size - expected} trailing bytes after the last tensor", path=path)
    return Header({t.name: t for t in tensors}, metadata, header_len, file_size)


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _parse_entry(name: str, entry, path: Path) -> TensorInfo:
    if type(entry) is not dict:
        raise FormatError("header entry is not an object", path=path, tensor=name)
    if len(entry) != 3 or entry.keys() != _ENTRY_KEYS:
        raise FormatError("header entry needs exactly dtype, shape and data_offsets", path=path, tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}", path=path, tensor=name)
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):  # bools are not sizes
        raise FormatError("shape is not a list of non-negative integers", path=path, tensor=name)
    if type(offsets) is not list or len(offsets) != 2:
        raise FormatError("data_offsets is not [begin, end]", path=path, tensor=name)
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0 or end < 0:
        raise FormatError("data_offsets is not [begin, end]", path=path, tensor=name)
    if end < begin:
        raise FormatError("data_offsets end before they begin", path=path, tensor=name)
    size = byte_size(dtype, shape)  # Python integers: no overflow to check, only the span
    if size is None:
        raise FormatError(f"shape {shape} does not fill whole bytes of {dtype}", path=path, tensor=name)
    if size != end - begin:
        raise FormatError(
            f"shape {shape} x {dtype} is {size} bytes but data_offsets span {end - begin}", path=path, tensor=name
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _read_header_fd(fd: int, path: Path) -> Header:
    file_size = os.fstat(fd).st_size
    if file_size < 8:
        raise FormatError(f"file is {file_size} bytes, shorter than the 8-byte header length", path=path)
    (header_len,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path, "header length"))
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_len} exceeds the 100 MB limit", path=path)
    if 8 + header_len > file_size:
        raise FormatError(f"header length {header_len} runs past the end of the file", path=path)
    return parse_header_bytes(_pread_exact(fd, header_len, 8, path, "header"), file_size, path)


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of the safetensors file at ``path``."""
    path = Path(path)
    fd = open_regular(path, "safetensors file")
    try:
        return _read_header_fd(fd, path)
    finally:
        os.close(fd)


class SafetensorsFile:
    """A validated safetensors file whose tensors are read on demand. The file stays open from
    the header read on, so every byte read comes from the file whose header was validated, even
    if the path is replaced meanwhile."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._fd = open_regular(self.path, "safetensors file")
        try:
            self.header = _read_header_fd(self._fd, self.path)
        except BaseException:
            self.close()
            raise

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.header.metadata

    def fileno(self) -> int:
        if self._fd is None:
            raise FormatError("file was closed", path=self.path)
        return self._fd

    def byte_range(self, name: str) -> ByteRange:
        """Where tensor ``name``'s bytes lie, for a raw copy."""
        info = self.tensors[name]
        return ByteRange(self.fileno(), self.header.data_start + info.begin, info.nbytes, self.path)

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of tensor ``name`` from byte ``start`` of its data (all by default)."""
        info = self.tensors[name]
        if length is None:
            length = info.nbytes - start
        return _pread_exact(self.fileno(), length, self.header.data_start + info.begin + start, self.path, "data")

    def read_into(self, name: str, out, start: int = 0) -> None:
        """``len(out)`` bytes of tensor ``name`` from byte ``start`` of its data into ``out`` (a
        writable buffer), with no copy in between."""
        info = self.tensors[name]
        view = memoryview(out).cast("B")
        if start + len(view) > info.nbytes:
            raise ValueError(f"{len(view)} bytes from {start} run past a tensor of {info.nbytes}")
        done, length, start = 0, len(view), self.header.data_start + info.begin + start
        while done < length:
            try:
                n = files.preadinto(self.fileno(), view[done:], start + done)
            except OSError as exc:
                raise FormatError(f"cannot read the data: {os_reason(exc)}", path=self.path) from None
            if n == 0:
                raise FormatError("file shrank while being read (it ends inside the tensor data)", path=self.path)
            done += n

    def array(self, name: str) -> np.ndarray:
        """The whole tensor as a writable numpy array of its own dtype (bf16 via ml_dtypes)."""
        info = self.tensors[name]
        np_dtype = DTYPES[info.dtype].numpy
        if np_dtype is None:
            raise FormatError(f"dtype {info.dtype} cannot be decoded", path=self.path, tensor=name)
        buf = bytearray(self.read_bytes(name))
        return np.frombuffer(buf, dtype=np_dtype).reshape(info.shape)

    def arrays(self, names: list[str], max_read: int = 16 << 20) -> dict[str, np.ndarray]:
        """Several tensors at once, each as ``array`` gives it, read in as few ``pread`` calls as
        their layout allows (adjacent tensors share a read of up to ``max_read`` bytes)."""
        infos = sorted((self.tensors[n] for n in names), key=lambda t: t.begin)
        out: dict[str, np.ndarray] = {}
        i = 0
        while i < len(infos):
            j = i + 1
            while j < len(infos) and infos[j].begin == infos[j - 1].end and infos[j].end - infos[i].begin <= max_read:
                j += 1
            start = infos[i].begin
            buf = bytearray(_pread_exact(self.fileno(), infos[j - 1].end - start, self.header.data_start + start,
                                         self.path, "data"))
            for info in infos[i:j]:
                np_dtype = DTYPES[info.dtype].numpy
                if np_dtype is None:
                    raise FormatError(f"dtype {info.dtype} cannot be decoded", path=self.path, tensor=info.name)
                out[info.name] = np.frombuffer(buf, np_dtype, count=info.numel,
                                               offset=info.begin - start).reshape(info.shape)
            i = j
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
