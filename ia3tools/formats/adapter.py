"""PEFT IA3 adapter directories: ``adapter_config.json`` plus ``adapter_model.safetensors``
(or ``adapter_model.bin``).

Tensor keys are ``base_model.model.<module>.ia3_l`` for vectors and
``base_model.model.<module>.<param>`` for ``modules_to_save`` tensors (e.g. a classifier head).
Module names are those of the model PEFT wrapped (a task model such as
``BertForSequenceClassification``), which may differ from the base checkpoint's by a backbone
prefix; ``ia3tools.plan`` resolves that.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ia3tools.errors import AdapterError, FormatError
from ia3tools.formats.dtypes import DTYPES
from ia3tools.formats.files import is_dir
from ia3tools.formats.jsonstrict import load_json_file
from ia3tools.formats.pickled import BinFile
from ia3tools.formats.safetensors import SafetensorsFile

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
VECTOR_SUFFIX = ".ia3_l"


def vector_key(module: str) -> str:
    """The adapter file's key of the vector for ``module`` (named in the adapter's namespace)."""
    return f"{KEY_PREFIX}{module}{VECTOR_SUFFIX}"


def _names(value, field_name: str, path: Path, *, optional: bool = False) -> list[str] | str | None:
    """A config field that PEFT allows as a list of names or one regex string."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise AdapterError(f"{field_name} is not a valid regular expression ({exc})", path=path) from None
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AdapterError(f"{field_name} must be a list of module names or a regex string", path=path)


ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head


def is_all_linear(spec) -> bool:
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


class ModuleNames:
    """A ``target_modules``, ``exclude_modules`` or ``feedforward_modules`` value, matched as PEFT
    matches it. A string is a regex, ``re.fullmatch``-ed. A list matches by suffix: under the
    ``dot`` rule (targets, exclusions) a module whose name is an entry or ends in ``.<entry>``;
    under the ``plain`` rule (feed-forward) any module whose name ends in an entry, so that
    ``output.dense`` also marks ``attention.output.dense``. Lists are matched through a set of
    the module's suffixes, so a list of thousands of names costs no more than one."""

    def __init__(self, spec: list[str] | str, rule: str):
        self.spec = spec
        self.rule = rule
        self._regex = re.compile(spec) if isinstance(spec, str) else None
        self._names = frozenset(spec) if isinstance(spec, list) else frozenset()
        self._lengths = sorted({len(n) for n in self._names})

    def __call__(self, module: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(module) is not None
        return any(s in self._names for s in self._suffixes(module))

    def _suffixes(self, module: str):
        """The suffixes of ``module`` that could be entries (one per entry length)."""
        n = len(module)
        for length in self._lengths:
            if length > n:
                break
            if self.rule == "plain" or length == n or module[n - length - 1] == ".":
                yield module[n - length:]

    def unmatched(self, modules) -> list[str]:
        """The list entries that match none of ``modules`` (a regex: [spec] when it matches none)."""
        if self._regex is not None:
            return [] if any(self(m) for m in modules) else [self.spec]
        seen = {s for m in modules for s in self._suffixes(m) if s in self._names}
        return [n for n in self.spec if n not in seen]


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    target_modules: list[str] | str
    feedforward_modules: list[str] | str
    fan_in_fan_out: bool
    modules_to_save: list[str]
    exclude_modules: list[str] | str | None
    task_type: str | None
    base_model_name_or_path: str | None
    raw: dict = field(repr=False)

    def __post_init__(self):  # compile the matching rules once (frozen: set through object)
        targets = None if is_all_linear(self.target_modules) else ModuleNames(self.target_modules, "dot")
        excluded = ModuleNames(self.exclude_modules, "dot") if self.exclude_modules else None
        saved = [re.compile(rf"(^|.*\.){re.escape(m)}($|\..*)") for m in self.modules_to_save]
        object.__setattr__(self, "_targets", targets)
        object.__setattr__(self, "_excluded", excluded)
        object.__setattr__(self, "_feedforward", ModuleNames(self.feedforward_modules, "plain"))
        object.__setattr__(self, "_saved", saved)

    @property
    def all_linear(self) -> bool:
        return self._targets is None

    def is_target(self, module: str) -> bool:
        if self._excluded is not None and self._excluded(module):
            return False
        if self._targets is None:
            return True  # PEFT expands all-linear to every linear layer but the output head
        return self._targets(module)

    def is_feedforward(self, module: str) -> bool:
        """PEFT's feedforward rule, which differs from the target rule (see ``ModuleNames``)."""
        return self._feedforward(module)

    def saved_module_of(self, module_param: str) -> str | None:
        """The ``modules_to_save`` entry owning a parameter name, as PEFT's wrapper matches it."""
        for entry, pattern in zip(self.modules_to_save, self._saved):
            if pattern.match(module_param):
                return entry
        return None


def read_config(directory: Path) -> AdapterConfig:
    path = directory / CONFIG_NAME
    if not os.path.lexists(path):
        raise AdapterError(f"no {CONFIG_NAME} (not a PEFT adapter directory)", path=directory)
    doc = load_json_file(path, what="adapter config")
    if not isinstance(doc, dict):
        raise AdapterError("adapter config is not a JSON object", path=path)
    peft_type = doc.get("peft_type")
    if peft_type != "IA3":
        raise AdapterError(f"peft_type is {peft_type!r}, not 'IA3'", path=path)
    if doc.get("target_modules") is None:
        raise AdapterError("target_modules is not set", path=path)
    if doc.get("feedforward_modules") is None:
        raise AdapterError("feedforward_modules is not set", path=path)
    fan = doc.get("fan_in_fan_out", False)
    if not isinstance(fan, bool):
        raise AdapterError("fan_in_fan_out must be true or false", path=path)
    mts = doc.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
        raise AdapterError("modules_to_save must be a list of module names", path=path)
    for key in ("task_type", "base_model_name_or_path"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise AdapterError(f"{key} must be a string", path=path)
    return AdapterConfig(
        path=path,
        target_modules=_names(doc["target_modules"], "target_modules", path),
        feedforward_modules=_names(doc["feedforward_modules"], "feedforward_modules", path),
        fan_in_fan_out=fan,
        modules_to_save=mts,
        exclude_modules=_names(doc.get("exclude_modules"), "exclude_modules", path, optional=True),
        task_type=doc.get("task_type"),
        base_model_name_or_path=doc.get("base_model_name_or_path"),
        raw=doc,
    )


@dataclass(frozen=True)
class HeadInfo:
    """A ``modules_to_save`` tensor: ``name`` is its parameter name in the adapter's namespace."""

    key: str
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Adapter:
    path: Path
    config: AdapterConfig
    weights_path: Path
    vectors: dict[str, np.ndarray]  # module name -> vector as stored, upcast to float32
    vector_dtypes: dict[str, str]  # module name -> dtype as stored
    heads: dict[str, HeadInfo]  # parameter name -> head tensor
    _reader: SafetensorsFile | BinFile = field(repr=False)

    def head_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """``length`` raw bytes (default: the rest) of head tensor ``name`` from byte ``start``."""
        return self._reader.read_bytes(self.heads[name].key, start, length)

    def sha256(self) -> str:
        """Hash of the adapter weights file, recorded as provenance in merged outputs."""
        h = hashlib.sha256()
        with open(self.weights_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def close(self) -> None:
        self._reader.close()


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter directory: its config strictly, its vectors into memory (they are small),
    its head tensors lazily."""
    directory = Path(path)
    if not is_dir(directory):
        raise AdapterError("adapter path must be a PEFT adapter directory", path=directory)
    config = read_config(directory)
    weights_path = next((directory / n for n in WEIGHT_NAMES if os.path.lexists(directory / n)), None)
    if weights_path is None:
        raise AdapterError(f"no adapter weights (looked for {', '.join(WEIGHT_NAMES)})", path=directory)
    reader = SafetensorsFile(weights_path) if weights_path.suffix == ".safetensors" else BinFile(weights_path)

    vector_keys: dict[str, str] = {}  # module -> key
    vector_dtypes: dict[str, str] = {}
    heads: dict[str, HeadInfo] = {}
    for key, info in reader.tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"key does not start with {KEY_PREFIX!r}", path=weights_path, tensor=key)
        name = key[len(KEY_PREFIX):]
        if name.endswith(VECTOR_SUFFIX):
            module = name[: -len(VECTOR_SUFFIX)]
            if not DTYPES[info.dtype].foldable:
                raise AdapterError(f"vector dtype {info.dtype} is not a float type", path=weights_path, tensor=key)
            vector_keys[module] = key
            vector_dtypes[module] = info.dtype
        elif config.saved_module_of(name) is not None:
            heads[name] = HeadInfo(key, name, info.dtype, tuple(info.shape))
        else:
            raise AdapterError(
                "tensor is neither an IA3 vector nor under modules_to_save", path=weights_path, tensor=key
            )
    arrays = reader.arrays(list(vector_keys.values()))
    vectors = {module: arrays[key].astype(np.float32) for module, key in vector_keys.items()}
    if not vectors and not heads:
        raise FormatError("adapter holds no tensors", path=weights_path)
    return Adapter(directory, config, weights_path, vectors, vector_dtypes, heads, reader)
