"""Checkpoints: a single safetensors file, a sharded safetensors index, or legacy PyTorch
``.bin`` files (single or sharded), all seen through one ``Checkpoint`` interface."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ia3tools.errors import FormatError, Notice
from ia3tools.formats.files import is_dir, os_reason
from ia3tools.formats.jsonstrict import load_json_file
from ia3tools.formats.pickled import BinFile
from ia3tools.formats.safetensors import ByteRange, SafetensorsFile
from ia3tools.formats.sentence import read_sentence_model

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# The order transformers looks for weights in a directory.
WEIGHT_NAMES = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)
_SHARD_PATTERN = re.compile(r".+-\d{5}-of-\d{5}\.(safetensors|bin)")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a checkpoint lives and what it is, without its data."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int
    shard: str  # file name of the shard holding it

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """A base model's weights. ``tensors`` keeps file order; ``files`` maps shard name to reader."""

    path: Path  # the directory (or the file given)
    format: str  # "safetensors" or "bin"
    sharded: bool
    files: dict[str, SafetensorsFile | BinFile]
    tensors: dict[str, TensorRef]
    warnings: list[Notice] = field(default_factory=list)

    def reader(self, name: str) -> SafetensorsFile | BinFile:
        return self.files[self.tensors[name].shard]

    def array(self, name: str) -> np.ndarray:
        return self.reader(name).array(name)

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        return self.reader(name).read_bytes(name, start, length)

    def read_into(self, name: str, out, start: int = 0) -> None:
        """``len(out)`` bytes of tensor ``name`` from byte ``start`` into the writable buffer ``out``."""
        self.reader(name).read_into(name, out, start)

    def byte_range(self, name: str) -> ByteRange | None:
        """Where a tensor's bytes lie in its file, for a raw copy; None where the format has no
        such thing (a pickled ``.bin``)."""
        reader = self.reader(name)
        return reader.byte_range(name) if isinstance(reader, SafetensorsFile) else None

    def shard_tensors(self) -> dict[str, list[TensorRef]]:
        """Tensors grouped by shard, shards in index order."""
        groups: dict[str, list[TensorRef]] = {shard: [] for shard in self.files}
        for ref in self.tensors.values():
            groups[ref.shard].append(ref)
        return groups

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint directory, a ``*.safetensors``/``*.bin`` file or an ``*.index.json``."""
    path = Path(path)
    if is_dir(path):
        for name in WEIGHT_NAMES:
            if os.path.lexists(path / name):
                return open_checkpoint_file(path / name, root=path)
        sentence = read_sentence_model(path)
        if sentence is not None and sentence.transformer_dir != path:  # weights in 0_Transformer/
            return open_checkpoint(sentence.transformer_dir)
        if (path / "adapter_config.json").exists():
            raise FormatError("this is an adapter directory, not a base checkpoint", path=path)
        raise FormatError(f"no weights found (looked for {', '.join(WEIGHT_NAMES)})", path=path)
    return open_checkpoint_file(path, root=path)


def open_checkpoint_file(file: Path, *, root: Path) -> Checkpoint:
    name = file.name
    if name.endswith(".index.json"):
        return _open_index(file, root)
    if name.endswith(".safetensors"):
        reader = SafetensorsFile(file)
        return Checkpoint(root, "safetensors", False, {name: reader}, _refs(reader, name))
    if name.endswith((".bin", ".pt", ".pth")):
        reader = BinFile(file)
        return Checkpoint(root, "bin", False, {name: reader}, _refs(reader, name))
    raise FormatError("not a checkpoint (expected .safetensors, .bin or .index.json)", path=file)


def _refs(reader, shard: str) -> dict[str, TensorRef]:
    return {
        info.name: TensorRef(info.name, info.dtype, info.shape, info.nbytes, shard) for info in reader.tensors.values()
    }


def _open_index(index_path: Path, root: Path) -> Checkpoint:
    directory = index_path.parent
    fmt = "bin" if index_path.name.endswith(".bin.index.json") else "safetensors"
    doc = load_json_file(index_path, what="index")
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise FormatError("index has no weight_map object", path=index_path)
    weight_map: dict = doc["weight_map"]
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FormatError(f"weight_map value is {type(shard).__name__}, not a shard file name", path=index_path,
                              tensor=name)
    metadata = doc.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise FormatError("index metadata is not an object", path=index_path)
    total = (metadata or {}).get("total_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)):
        raise FormatError("index metadata total_size is not an integer", path=index_path)

    shard_names = sorted(set(weight_map.values()))
    files: dict[str, SafetensorsFile | BinFile] = {}
    for shard in shard_names:
        shard_path = resolve_member(directory, shard, index_path, what="shard")
        if fmt == "safetensors" and not shard.endswith(".safetensors"):
            raise FormatError(f"safetensors index names shard {shard!r}, which is not a .safetensors file", path=index_path)
        if not os.path.lexists(shard_path):
            raise FormatError(f"shard {shard!r} named in the index is missing", path=index_path)
        files[shard] = SafetensorsFile(shard_path) if fmt == "safetensors" else BinFile(shard_path)

    tensors: dict[str, TensorRef] = {}
    for shard, reader in files.items():
        for info in reader.tensors.values():
            owner = weight_map.get(info.name)
            if owner is None:
                raise FormatError("tensor is in the shard but not in the index", path=reader.path, tensor=info.name)
            if owner != shard:
                raise FormatError(f"tensor is also in shard {owner!r}", path=reader.path, tensor=info.name)
            tensors[info.name] = TensorRef(info.name, info.dtype, info.shape, info.nbytes, shard)
    for name, shard in weight_map.items():
        if name not in tensors:
            raise FormatError(f"index places the tensor in {shard!r}, but that shard lacks it", path=index_path, tensor=name)

    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    for other in sorted(os.listdir(directory)):
        if _SHARD_PATTERN.fullmatch(other) and other.endswith(suffix) and other not in files:
            raise FormatError(f"shard file {other!r} is present but not named in the index", path=index_path)

    ckpt = Checkpoint(root, fmt, True, files, tensors)
    actual = sum(r.nbytes for r in tensors.values())
    if total is not None and total != actual:
        ckpt.warnings.append(Notice("total-size", f"{index_path}: index total_size {total} disagrees with the "
                                    f"shards' {actual} bytes", file=str(index_path)))
    return ckpt


def resolve_member(directory: Path, name, referrer: Path, *, what: str) -> Path:
    """``directory/name`` for a plain file name that stays inside ``directory``.

    Refuses absolute names, ``..``, subdirectories and symlinks that resolve elsewhere: a hostile
    index must not make us read outside the checkpoint. The one exception is the Hugging Face hub
    cache, whose ``snapshots/<rev>/`` files are symlinks into the same repository's ``blobs/``.
    """
    if (
        name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise FormatError(f"{what} name {name!r} is not a plain file name", path=referrer)
    member = directory / name
    try:
        real_dir = directory.resolve(strict=True)
        real = member.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        reason = os_reason(exc) if isinstance(exc, OSError) else "symbolic link loop"
        raise FormatError(f"{what} {name!r} cannot be resolved: {reason}", path=referrer) from None
    in_hub_blobs = real_dir.parent.name == "snapshots" and real.parent == real_dir.parent.parent / "blobs"
    if real.parent != real_dir and not in_hub_blobs:
        raise FormatError(f"{what} {name!r} resolves outside the directory", path=referrer)
    return member

