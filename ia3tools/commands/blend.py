"""``blend``: combine IA3 adapters into one new, PEFT-loadable adapter.

``linear`` is Σ wᵢ·lᵢ, accumulated in float32 in the adapters' order, exactly as PEFT's
``add_weighted_adapter``; ``geometric`` is Π lᵢ^wᵢ, computed as exp(Σ wᵢ·log lᵢ) in float64 and
rounded once to float32. A module some adapters lack counts as a vector of ones (``identity``: that
adapter leaves the module alone) or is skipped (``zero``, PEFT's behaviour).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ia3tools import __version__
from ia3tools.card import blend_card
from ia3tools.errors import BlendError, Notice
from ia3tools.formats.adapter import CONFIG_NAME, WEIGHT_NAMES, Adapter, read_adapter, vector_key
from ia3tools.publish import Staging, check_output_path
from ia3tools.reports import Report
from ia3tools.write import OutTensor, validate_adapter, write_safetensors

METHODS = ("linear", "geometric")
MISSING = ("identity", "zero")


@dataclass(frozen=True)
class BlendOptions:
    weights: tuple[float, ...]  # one per adapter, in order
    method: str = "linear"  # linear or geometric
    missing: str = "identity"  # identity or zero
    heads_from: str | None = None  # adapter (as given, or its directory name) whose heads win
    force: bool = False


@dataclass(frozen=True)
class BlendSource:
    path: str
    sha256: str
    weight: float


@dataclass
class BlendReport(Report):
    command: ClassVar[str] = "blend"
    output: str
    method: str
    missing: str
    sources: list[BlendSource]
    modules: int
    partial_modules: int  # modules some adapters lack
    heads: list[str]


def blend(adapters: list[str | os.PathLike], out: str | os.PathLike, options: BlendOptions) -> BlendReport:
    """Blend ``adapters`` with ``options`` into a new adapter directory ``out``. Everything is
    validated before any arithmetic; failures raise ``Ia3Error``."""
    paths, out = [Path(a) for a in adapters], Path(out)
    _check_options(paths, options)
    with contextlib.ExitStack() as inputs:
        loaded = [inputs.enter_context(contextlib.closing(read_adapter(p))) for p in paths]
        warnings: list[Notice] = []
        _check_compatible(loaded, options, warnings)
        vectors, partial = _blend_vectors(loaded, options)
        heads = _pick_heads(loaded, paths, options)
        warnings += check_output_path(out, paths, options.force)
        config = _blend_config(loaded, vectors)
        sources = [BlendSource(str(p), a.sha256(), w) for p, a, w in zip(paths, loaded, options.weights)]
        metadata = {
            "format": "pt",
            "ia3tools_version": __version__,
            "ia3tools_blend_method": options.method,
            "ia3tools_blend_missing": options.missing,
            "ia3tools_blend_sources": json.dumps([vars(s) for s in sources]),
        }
        tensors = [_out_tensor(vector_key(m), v) for m, v in sorted(vectors.items())]
        tensors += [_out_head(a, name) for name, a in sorted(heads.items())]
        bases = {a.config.base_model_name_or_path for a in loaded if a.config.base_model_name_or_path}
        card = blend_card(name=out.name, base_id=bases.pop() if len(bases) == 1 else None, sources=sources,
                          method=options.method, missing=options.missing, command=_command(paths, out, options))
        with Staging(out, options.force) as staging:
            write_safetensors(staging.path / WEIGHT_NAMES[0], tensors, metadata)
            (staging.path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (staging.path / "README.md").write_text(card)
            staging.publish(validate_adapter)
        return BlendReport(str(out), options.method, options.missing, sources, len(vectors), partial, sorted(heads),
                           warnings=warnings + staging.notes)


def _command(paths: list[Path], out: Path, options: BlendOptions) -> str:
    """The command line that makes this blend (for its model card)."""
    parts = [*map(str, paths), "--weights", ",".join(f"{w:g}" for w in options.weights),
             "--method", options.method, "--missing", options.missing, "-o", str(out)]
    if options.heads_from:
        parts += ["--heads-from", options.heads_from]
    return "ia3tools blend " + shlex.join(parts)


def _check_options(paths: list[Path], options: BlendOptions) -> None:
    if len(paths) < 2:
        raise BlendError("blend needs at least two adapters")
    if len(options.weights) != len(paths):
        raise BlendError(f"{len(paths)} adapters but {len(options.weights)} weights: give one weight per adapter")
    if not all(math.isfinite(w) for w in options.weights):
        raise BlendError("weights must be finite numbers")
    if options.method not in METHODS or options.missing not in MISSING:
        raise BlendError(f"method must be one of {METHODS} and missing one of {MISSING}")
    if options.heads_from is not None and _index_of(paths, options.heads_from) is None:
        raise BlendError(f"--heads-from {options.heads_from!r} is not one of the adapters being blended")


def _index_of(paths: list[Path], name: str) -> int | None:
    matches = [i for i, p in enumerate(paths) if name in (str(p), p.name, str(p).rstrip("/"))]
    if len(matches) > 1:
        raise BlendError(f"--heads-from {name!r} names several adapters; give its path")
    return matches[0] if matches else None


def _spelling(name: str) -> str:
    return os.path.normpath(os.path.expanduser(name)).rstrip("/").lower()


def _check_compatible(adapters: list[Adapter], options: BlendOptions, warnings: list[Notice]) -> None:
    first = adapters[0]
    for a in adapters[1:]:
        if a.config.fan_in_fan_out != first.config.fan_in_fan_out:
            raise BlendError(f"fan_in_fan_out is {str(a.config.fan_in_fan_out).lower()} here but "
                             f"{str(first.config.fan_in_fan_out).lower()} in {first.path}", path=a.config.path)
        if a.config.task_type and first.config.task_type and a.config.task_type != first.config.task_type:
            raise BlendError(f"task_type {a.config.task_type} differs from {first.config.task_type} in {first.path}",
                             path=a.config.path)
    names = [a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path]
    if len(set(names)) > 1:
        if len({_spelling(n) for n in names}) == 1:
            warnings.append(Notice("base-name-spelling", "base_model_name_or_path differs only in spelling: "
                                   f"{', '.join(sorted(set(names)))}"))
        else:
            warnings.append(Notice("base-names-differ", f"adapters name different bases ({', '.join(sorted(set(names)))}); "
                                   "their vector shapes agree, so blending anyway"))
    seen: dict[str, tuple[Adapter, np.ndarray]] = {}
    for a in adapters:
        for module, v in a.vectors.items():
            if module not in seen:
                seen[module] = (a, v)
                continue
            other, w = seen[module]
            if v.shape != w.shape:
                raise BlendError(f"vector shape {list(v.shape)} differs from {list(w.shape)} in {other.path} "
                                 "(different base models?)", path=a.weights_path, tensor=module)
            if a.config.is_feedforward(module) != other.config.is_feedforward(module):
                raise BlendError(f"feed-forward here but not in {other.path} (or the reverse): orientations differ",
                                 path=a.config.path, tensor=module)
    if options.method == "linear" and not math.isclose(sum(options.weights), 1.0, abs_tol=1e-9):
        warnings.append(Notice("weights-sum", f"linear weights sum to {sum(options.weights):g}, not 1: every "
                               "module is rescaled"))
    if options.method == "geometric":
        for a in adapters:
            for module, v in a.vectors.items():
                if not np.all(v > 0):
                    raise BlendError("geometric blending needs positive entries; this vector has "
                                     f"{int(np.count_nonzero(v <= 0))} <= 0", path=a.weights_path, tensor=module)


def _blend_vectors(adapters: list[Adapter], options: BlendOptions) -> tuple[dict[str, np.ndarray], int]:
    modules = sorted({m for a in adapters for m in a.vectors})
    out, partial = {}, 0
    for module in modules:
        shape = next(a.vectors[module].shape for a in adapters if module in a.vectors)
        present = [module in a.vectors for a in adapters]
        partial += not all(present)
        if options.missing == "zero" and options.method == "geometric" and not all(present):
            raise BlendError("geometric blending with --missing zero would zero this module", tensor=module)
        terms = [(a.vectors.get(module), w) for a, w in zip(adapters, options.weights)]
        if options.missing == "identity":
            terms = [(np.ones(shape, np.float32) if v is None else v, w) for v, w in terms]
        terms = [(v, w) for v, w in terms if v is not None]
        if options.method == "linear":
            acc = np.zeros(shape, np.float32)
            for v, w in terms:  # PEFT: target.data += source.data * weight, in float32, in order
                acc += v * np.float32(w)
        else:
            acc = np.exp(sum(w * np.log(v.astype(np.float64)) for v, w in terms)).astype(np.float32)
        if not np.all(np.isfinite(acc)):
            raise BlendError("blend produces non-finite entries", tensor=module)
        out[module] = acc
    return out, partial


def _pick_heads(adapters, paths, options: BlendOptions) -> dict[str, Adapter]:
    owners: dict[str, list[int]] = {}
    for i, a in enumerate(adapters):
        for name in a.heads:
            owners.setdefault(name, []).append(i)
    chosen = None if options.heads_from is None else _index_of(paths, options.heads_from)
    heads = {}
    for name, idx in owners.items():
        if len(idx) > 1:
            if chosen is None:
                raise BlendError(f"modules_to_save tensor is in {len(idx)} adapters ({', '.join(str(paths[i]) for i in idx)}); "
                                 "choose whose heads to keep with --heads-from", tensor=name)
            if chosen not in idx:
                raise BlendError(f"--heads-from {options.heads_from!r} lacks this head, which several adapters have",
                                 tensor=name)
            heads[name] = adapters[chosen]
        else:
            heads[name] = adapters[idx[0]]
    return heads


_SCOPE_KEYS = ("target_modules", "feedforward_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _blend_config(adapters: list[Adapter], vectors: dict[str, np.ndarray]) -> dict:
    """The blended adapter's config. Inputs that scope their modules alike keep that scope (regexes,
    ``all-linear`` and exclusions included). Otherwise no union of their specs is safe: a regex
    cannot hold ``all-linear``, and one input's exclusion may cover another's module. The blend
    then names exactly the modules it has vectors for, which PEFT's list rule matches one to one,
    and needs no exclusions."""
    config = dict(adapters[0].config.raw)
    scopes = [tuple(json.dumps(a.config.raw.get(k), sort_keys=True) for k in _SCOPE_KEYS) for a in adapters]
    if len(set(scopes)) > 1:
        modules = sorted(vectors)
        config["target_modules"] = modules
        config["feedforward_modules"] = [m for m in modules
                                         if any(m in a.vectors and a.config.is_feedforward(m) for a in adapters)]
        for key in _SCOPE_KEYS[2:]:
            if key in config:
                config[key] = None
    saved = sorted({m for a in adapters for m in a.config.modules_to_save})
    config["modules_to_save"] = saved or None
    config["inference_mode"] = True
    return config


def _out_tensor(key: str, v: np.ndarray) -> OutTensor:
    data = np.ascontiguousarray(v, dtype=np.float32)
    return OutTensor(key, "F32", tuple(data.shape), data.nbytes, chunks=lambda: [data.tobytes()])


def _out_head(adapter: Adapter, name: str) -> OutTensor:
    info = adapter.heads[name]
    data = adapter.head_bytes(name)
    return OutTensor(info.key, info.dtype, info.shape, len(data), chunks=lambda: [data])
