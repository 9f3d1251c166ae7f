"""sentence-transformers model directories: ``modules.json`` names the modules in order (the
Transformer, usually at the root or in ``0_Transformer/``, then Pooling, Normalize, ...), each in
its own subdirectory with its own config. Read strictly; both the pooling config of
sentence-transformers 6 (``pooling_mode``) and the older one (``pooling_mode_*_tokens`` flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ia3tools.errors import FormatError
from ia3tools.formats.jsonstrict import load_json_file

MODULES_NAME = "modules.json"
# the side files of a sentence-transformers model, beside modules.json
SIDE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# legacy flag -> mode, in the order sentence-transformers concatenates them
_LEGACY_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class Module:
    index: int
    name: str
    path: str  # relative to the model directory; "" for the root
    kind: str  # the class name: Transformer, Pooling, Normalize, Dense, ...


@dataclass(frozen=True)
class SentenceModel:
    directory: Path
    modules: tuple[Module, ...]
    pooling: tuple[str, ...] | None  # the pooling modes, in concatenation order; None without Pooling
    normalize: bool

    @property
    def transformer_dir(self) -> Path:
        """Where the Transformer module's weights and config are (the root, or a subfolder)."""
        first = self.modules[0]
        return self.directory / first.path if first.path else self.directory

    @property
    def module_dirs(self) -> list[str]:
        """The subdirectories the modules live in (the Transformer's too, when it has one)."""
        return [m.path for m in self.modules if m.path]


def read_sentence_model(directory: Path) -> SentenceModel | None:
    """The sentence-transformers model in ``directory``; None when it has no modules.json."""
    directory = Path(directory)
    path = directory / MODULES_NAME
    if not os.path.lexists(path):
        return None
    doc = load_json_file(path, what="sentence-transformers modules")
    if not isinstance(doc, list) or not doc:
        raise FormatError("modules.json is not a non-empty list of modules", path=path)
    modules = []
    for entry in doc:
        if not (isinstance(entry, dict) and isinstance(entry.get("idx"), int) and all(
                isinstance(entry.get(k), str) for k in ("name", "path", "type"))):
            raise FormatError("each module needs idx (an integer) and name, path and type (strings)", path=path)
        rel = entry["path"]
        if rel and (os.path.isabs(rel) or ".." in Path(rel).parts or "\\" in rel or "\x00" in rel):
            raise FormatError(f"module path {rel!r} is not a plain directory name inside the model", path=path)
        if rel and not (directory / rel).is_dir():
            raise FormatError(f"module directory {rel!r} is missing", path=path)
        modules.append(Module(entry["idx"], entry["name"], rel, entry["type"].rpartition(".")[2]))
    modules.sort(key=lambda m: m.index)
    if modules[0].kind != "Transformer":
        raise FormatError(f"the first module is {modules[0].kind}, not a Transformer", path=path)
    pooling = None
    for m in modules:
        if m.kind == "Pooling":
            pooling = _pooling_modes(directory / m.path / "config.json")
    return SentenceModel(directory, tuple(modules), pooling, any(m.kind == "Normalize" for m in modules))


def _pooling_modes(path: Path) -> tuple[str, ...]:
    doc = load_json_file(path, what="pooling config")
    if not isinstance(doc, dict):
        raise FormatError("pooling config is not a JSON object", path=path)
    mode = doc.get("pooling_mode")
    if mode is None:
        flags = [k for k in _LEGACY_FLAGS if doc.get(k)]
        if any(not isinstance(doc.get(k, False), bool) for k in _LEGACY_FLAGS):
            raise FormatError("pooling_mode_* flags must be true or false", path=path)
        modes = tuple(_LEGACY_FLAGS[k] for k in flags) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else None
        if not modes or not all(isinstance(m, str) for m in modes):
            raise FormatError("pooling_mode must be a mode or a list of modes", path=path)
    for m in modes:
        if m not in POOLING_MODES:
            raise FormatError(f"unknown pooling mode {m!r} (one of {', '.join(POOLING_MODES)})", path=path)
    return modes
