"""Legacy PyTorch ``.bin`` checkpoints, read only through ``torch.load(weights_only=True)``.

Pickle can run arbitrary code; ``weights_only=True`` restricts it to an allowlist of tensor
types, and torch < 2.6 had a bypass (CVE-2025-32434), so older torch is refused outright.
torch is imported here only, so safetensors-only work never pays for it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ia3tools.errors import FormatError, require
from ia3tools.formats.dtypes import DTYPES, byte_size, from_torch
from ia3tools.formats.files import open_regular


@dataclass(frozen=True)
class BinTensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _torch_version_ok(version: str) -> bool:
    parts = version.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (2, 6)
    except (ValueError, IndexError):
        return False


def _reason(exc: Exception) -> str:
    """The specific line of torch's error (e.g. the blocked global), never its advice to retry with
    weights_only=False, which is the one thing not to do with an untrusted file."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler" in line:
            return line.removeprefix("WeightsUnpickler error: ") + " (nothing was executed)"
    specific = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line]
    return (specific or lines or [type(exc).__name__])[0]


class BinFile:
    """A ``.bin`` state dict, memory-mapped by torch. The file is held open and its size checked
    before every read: truncating a memory-mapped file would otherwise kill the process with
    SIGBUS on the next access."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata = None
        self._state: dict = {}
        self._fd: int | None = None
        self._fd = open_regular(self.path, ".bin file")
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        torch = require("torch", "torch", "reading .bin checkpoints")

        if not _torch_version_ok(torch.__version__):
            raise FormatError(
                f"reading .bin checkpoints needs torch >= 2.6 (found {torch.__version__}): older "
                "weights_only loading can execute code (CVE-2025-32434); convert to safetensors",
                path=self.path,
            )
        opened = os.fstat(self._fd)
        self._size = opened.st_size
        try:
            with warnings.catch_warnings():  # e.g. torch's beta warnings for sparse tensors
                warnings.simplefilter("ignore")
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise FormatError(f"refused by weights-only unpickling: {_reason(exc)}", path=self.path) from None
        now = os.stat(self.path)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise FormatError(".bin file was replaced while being opened", path=self.path)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise FormatError("not a state dict of named tensors", path=self.path)
        self._state = state
        self.tensors: dict[str, BinTensorInfo] = {}
        for name, t in state.items():
            problem = _unsupported(t)
            if problem:
                raise FormatError(f"{problem} tensors cannot be merged", path=self.path, tensor=name)
            dtype = from_torch(t.dtype)
            if dtype is None:
                raise FormatError(f"unsupported dtype {t.dtype}", path=self.path, tensor=name)
            shape = tuple(t.shape)
            self.tensors[name] = BinTensorInfo(name, dtype, shape, byte_size(dtype, shape))

    def _check_unchanged(self) -> None:
        if self._fd is None:
            raise FormatError("file was closed", path=self.path)
        if os.fstat(self._fd).st_size < self._size:
            raise FormatError("file shrank while being read", path=self.path)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a numpy array of its own dtype (bf16 through its bit pattern)."""
        info = self.tensors[name]
        return np.frombuffer(bytearray(self.read_bytes(name)), dtype=DTYPES[info.dtype].numpy).reshape(info.shape)

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: self.array(n) for n in names}

    def read_into(self, name: str, out, start: int = 0) -> None:
        view = memoryview(out).cast("B")
        view[:] = self.read_bytes(name, start, len(view))

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """A byte range of the tensor, sliced from a byte view (no copy of the rest)."""
        import torch

        self._check_unchanged()
        t = self._state[name]
        if t.numel() == 0:
            return b""
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        end = flat.numel() if length is None else start + length
        return flat[start:end].numpy().tobytes()

    def close(self) -> None:
        self._state = {}
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def _unsupported(t) -> str | None:
    """Why a loaded tensor cannot be read as plain bytes (None when it can)."""
    import torch

    if t.layout != torch.strided:
        return f"sparse ({str(t.layout).removeprefix('torch.')})"
    if t.is_meta:
        return "meta (no data)"
    if t.is_quantized:
        return f"quantized ({str(t.dtype).removeprefix('torch.')})"
    if t.device.type != "cpu":
        return f"{t.device.type}"
    return None
