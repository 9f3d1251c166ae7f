"""``extract``: recover, exactly, an IA3 adapter from a base checkpoint and a merge of it.

The contract is that ``merge BASE ADAPTER`` reproduces MERGED's tensors bit for bit (not that the
original adapter comes back: a module whose fold changed nothing disappears). Both checkpoints are
streamed tensor by tensor: identical tensors are compared as bytes, changed ones are fitted module by
module (``ia3tools.extraction``), and where both orientations fit, the documented order decides
(``ia3tools.extract_rules``). Whole modules that changed and no vector explains become
``modules_to_save``; anything else that changed is refused, naming the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ia3tools import __version__
from ia3tools.card import base_model_id, extract_card, read_card_metadata
from ia3tools.compare import Change, tensor_change
from ia3tools.errors import ExtractError
from ia3tools.extract_rules import adapter_config, choose_layout, resolve
from ia3tools.extraction import Pair, explained, fit, nearly_constant, orientations
from ia3tools.formats import open_checkpoint
from ia3tools.formats.adapter import CONFIG_NAME, KEY_PREFIX, WEIGHT_NAMES, vector_key
from ia3tools.formats.config import architecture, read_model_config
from ia3tools.formats.dtypes import DTYPES
from ia3tools.formats.hub import locate
from ia3tools.publish import Staging, check_output_path
from ia3tools.reports import Report
from ia3tools.write import OutTensor, validate_adapter, write_safetensors

HEAD_FRACTION = 0.5  # a module is "wholly changed" when each of its tensors differs in at least this share
_LAYERS = {2: "linear", 4: "conv", 5: "conv"}  # weight dims IA3 folds into (Linear/Conv1D, Conv2d, Conv3d)


@dataclass(frozen=True)
class ExtractOptions:
    force: bool = False


@dataclass(frozen=True)
class ExtractedModule:
    """One recovered vector: ``scales`` outputs or inputs (feed-forward), ``decided_by`` how the
    orientation was chosen: ``data`` (only one fits), ``other-layers``, ``model-type`` or ``rule``."""

    module: str
    layer: str  # linear, conv1d or conv
    scales: str
    length: int
    decided_by: str


@dataclass
class ExtractReport(Report):
    command: ClassVar[str] = "extract"
    base: str
    merged: str
    output: str
    tensors: int  # compared
    changed: int  # tensors that differ
    modules: list[ExtractedModule]
    heads: list[str]  # modules_to_save
    fan_in_fan_out: bool
    task_type: str | None
    base_id: str | None = None


@dataclass
class _Fit:
    module: str
    layer: str  # linear, conv1d or conv
    vectors: dict[bool, np.ndarray]  # feedforward -> vector, one or both orientations
    decided_by: str = "data"


def extract(base: str | os.PathLike, merged: str | os.PathLike, out: str | os.PathLike,
            options: ExtractOptions = ExtractOptions()) -> ExtractReport:
    """Write to ``out`` the IA3 adapter that re-merges ``base`` into ``merged`` bit for bit (both
    directories, files or hub ids in the local cache). Failures raise ``Ia3Error``."""
    out = Path(out)
    with contextlib.ExitStack() as inputs:
        located, merged_at = locate(base), locate(merged, "merged model")
        b = inputs.enter_context(contextlib.closing(open_checkpoint(located.path)))
        m = inputs.enter_context(contextlib.closing(open_checkpoint(merged_at.path)))
        warnings = check_output_path(out, [located.path, merged_at.path], options.force)
        changes = _changes(b, m)
        base_dir = b.path if b.path.is_dir() else b.path.parent
        model_config = read_model_config(base_dir) or {}
        model_type = model_config.get("model_type")
        fits, heads = _recover(b, m, changes, model_type)
        warnings += resolve(fits, model_type)
        fits.sort(key=lambda f: f.module)
        modules = _modules(b.tensors)
        config = adapter_config(fits, heads, modules, architecture(model_config),
                                located.hub_id or os.fspath(base))
        tensors = [_vector_tensor(f, b.tensors[f"{f.module}.weight"]) for f in fits]
        tensors += [_head_tensor(m, name) for module in heads for name in modules[module]]
        report = ExtractReport(
            str(located.path), str(merged_at.path), str(out), len(b.tensors), sum(c.differs for c in changes.values()),
            [ExtractedModule(f.module, f.layer, "inputs" if _chosen(f) else "outputs", len(f.vectors[_chosen(f)]),
                             f.decided_by) for f in fits],
            heads, config["fan_in_fan_out"], config["task_type"], base_id=located.hub_id, warnings=warnings)
        metadata = {"format": "pt", "ia3tools_version": __version__,
                    "ia3tools_extracted_from": json.dumps({"base": os.fspath(base), "merged": os.fspath(merged)})}
        card = extract_card(name=out.name, base_id=base_model_id(located.hub_id, None, read_card_metadata(base_dir),
                                                                 base_dir), merged=os.fspath(merged),
                            modules=len(fits), heads=heads,
                            command="ia3tools extract " + shlex.join([os.fspath(base), os.fspath(merged), "-o",
                                                                      str(out)]))
        with Staging(out, options.force) as staging:
            write_safetensors(staging.path / WEIGHT_NAMES[0], tensors, metadata)
            (staging.path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (staging.path / "README.md").write_text(card)
            staging.publish(validate_adapter)
        report.warnings += staging.notes
        return report


def _changes(b, m) -> dict[str, Change]:
    """How each tensor differs, once names, dtypes and shapes are checked; refuses non-finite
    changes and a merge that changed nothing."""
    _check_names(b, m)
    changes = {n: tensor_change(b, m, n, n, ref) for n, ref in b.tensors.items()}
    for name, c in changes.items():
        if c.non_finite:
            raise ExtractError(f"{c.non_finite} inf or NaN values where the base's differ (a fold that "
                               "overflowed: no finite vector reproduces it)", path=m.reader(name).path, tensor=name)
    if not any(c.differs for c in changes.values()):
        raise ExtractError("every tensor equals the base's, bit for bit: there is no adapter to extract", path=m.path)
    return changes


def _recover(b, m, changes: dict[str, Change], model_type: str | None) -> tuple[list[_Fit], list[str]]:
    """The vectors of every changed module, and the modules kept whole as heads."""
    modules = _modules(b.tensors)
    by_module: dict[str, list[str]] = {}
    for name, c in changes.items():
        if c.differs:
            by_module.setdefault(_module_of(name), []).append(name)
    layout = choose_layout(model_type, b, by_module, m.reader)
    fits, heads = [], []
    for module, names in by_module.items():
        found, tried = _fit_module(b, m, module, names, layout)
        if found is not None:
            fits.append(found)
        else:
            _require_head(modules[module], changes, m, tried)
            heads.append(module)
    if not fits:
        raise ExtractError(f"only whole modules changed ({', '.join(sorted(heads))}): no IA3 vector explains them, "
                           "and an IA3 adapter needs at least one", path=m.path)
    return fits, sorted(heads)


def _check_names(b, m) -> None:
    """The same tensors on both sides, with the same dtypes and shapes."""
    for name, ref in m.tensors.items():
        if name not in b.tensors:
            raise ExtractError("tensor is in the merged model but not in the base (a merge keeps the base's names)",
                               path=m.reader(name).path, tensor=name)
    for name, ref in b.tensors.items():
        got = m.tensors.get(name)
        if got is None:
            raise ExtractError("tensor of the base is missing from the merged model", path=m.path, tensor=name)
        if (got.dtype, got.shape) != (ref.dtype, ref.shape):
            raise ExtractError(f"{got.dtype} {list(got.shape)} in the merged model but {ref.dtype} {list(ref.shape)} "
                               "in the base (extract needs the merge in the base's dtypes and shapes)",
                               path=m.reader(name).path, tensor=name)


def _module_of(tensor: str) -> str:
    return tensor.rpartition(".")[0] or tensor


def _modules(tensors) -> dict[str, list[str]]:
    """Module name -> its own tensors (``X.weight``, ``X.bias``, ...)."""
    out: dict[str, list[str]] = {}
    for name in tensors:
        out.setdefault(_module_of(name), []).append(name)
    return out


def _fit_module(b, m, module: str, changed: list[str], layout: str):
    """The vector(s) explaining ``module``'s changes (None when none does), and the (weight, bias,
    orientation) tried."""
    weight, bias = f"{module}.weight", f"{module}.bias"
    ref = b.tensors.get(weight)
    if ref is None or not DTYPES[ref.dtype].foldable or len(ref.shape) not in _LAYERS or 0 in ref.shape:
        return None, []
    if not set(changed) <= {weight, bias}:
        return None, []
    has_bias = bias in b.tensors and DTYPES[b.tensors[bias].dtype].foldable
    layer = layout if _LAYERS[len(ref.shape)] == "linear" else "conv"
    outputs, inputs = orientations(layer, has_bias)
    w = Pair(b, m, weight, ref)
    p_bias = Pair(b, m, bias, b.tensors[bias]) if has_bias else None
    tried, vectors = [(w, p_bias, outputs)], {}
    scaled = fit(w, p_bias, outputs)
    if scaled is not None:
        vectors[False] = scaled
    if bias not in changed and (scaled is None or nearly_constant(scaled)):
        tried.append((w, None, inputs))
        other = fit(w, None, inputs)
        if other is not None:
            vectors[True] = other
    return (_Fit(module, layer, vectors) if vectors else None), tried


def _require_head(tensors: list[str], changes: dict[str, Change], m, tried) -> None:
    """A module no vector explains is a ``modules_to_save`` head only when it changed whole, and
    not as a fold would but for a few rows or columns (that is a fold with edited elements)."""
    worst = next(n for n in tensors if changes[n].differs)
    if not all(changes[n].differs and changes[n].fraction >= HEAD_FRACTION for n in tensors):
        w = changes[worst]
        raise ExtractError(
            f"changed in a way no IA3 fold explains: {w.elements} of {w.total} elements differ (a fold scales whole "
            f"rows or columns; a module is kept as modules_to_save only when each of its tensors changed in at "
            f"least {HEAD_FRACTION:.0%} of its elements)", path=m.reader(worst).path, tensor=worst)
    for weight, bias, how in tried:
        agree = explained(weight, bias, how)
        if agree.mean() >= HEAD_FRACTION:
            off = np.flatnonzero(~agree)
            if not off.size:  # every interval is non-empty, yet no float32 in or near it re-merges
                raise ExtractError(
                    f"no float32 vector re-merges its {how.what} bit for bit, though each element's bounds agree "
                    f"(merged with other arithmetic than PEFT's float32 multiply and one rounding?)",
                    path=m.reader(weight.name).path, tensor=weight.name)
            raise ExtractError(
                f"changed in a way no IA3 fold explains: {len(off)} of {len(agree)} {how.what} (first: {off[0]}) "
                f"cannot be scaled to their merged values while the others can (edited elements?)",
                path=m.reader(weight.name).path, tensor=weight.name)


def _chosen(f: _Fit) -> bool:
    """The orientation kept (feed-forward or not), once ``resolve`` has left one."""
    return next(iter(f.vectors))


def _vector_tensor(f: _Fit, weight_ref) -> OutTensor:
    feedforward = _chosen(f)
    v = np.ascontiguousarray(f.vectors[feedforward], np.float32)
    if f.layer == "conv":
        shape = (1, len(v)) + (1,) * (len(weight_ref.shape) - 2)
    else:
        shape = (1, len(v)) if feedforward else (len(v), 1)
    data = v.reshape(shape)
    return OutTensor(vector_key(f.module), "F32", shape, data.nbytes, chunks=lambda: [data.tobytes()])


def _head_tensor(m, name: str) -> OutTensor:
    ref = m.tensors[name]
    raw = m.byte_range(name)
    if raw is not None:
        return OutTensor(KEY_PREFIX + name, ref.dtype, ref.shape, ref.nbytes, raw=raw)
    return OutTensor(KEY_PREFIX + name, ref.dtype, ref.shape, ref.nbytes, chunks=lambda: [m.read_bytes(name)])
