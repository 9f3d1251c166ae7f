"""The fold plan: before any arithmetic, decide which adapter vector folds into which base
tensor and how, and collect every reason it cannot.

Orientation is decided by two independent witnesses that must agree: the vector's stored shape
(``(out, 1)`` scales outputs, ``(1, in)`` scales inputs) and the config's ``feedforward_modules``.
Broadcasting is never trusted to decide it, since a square weight would accept either silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ia3tools.errors import Notice, PlanError, printable
from ia3tools.formats.adapter import Adapter, ModuleNames
from ia3tools.formats.checkpoint import Checkpoint
from ia3tools.formats.dtypes import DTYPES
from ia3tools.naming import BaseNames, NameMap, base_modules, resolve

_LAYERS = {2: "linear", 4: "conv2d", 5: "conv3d"}


def orientation(layer: str, feedforward: bool) -> tuple[int, str]:
    """The weight axis an IA3 vector runs along, and what it scales, as PEFT applies it:

    ======================  ====================  ==============================  =========================
    layer                   weight stored as      not feed-forward (outputs)      feed-forward (inputs)
    ======================  ====================  ==============================  =========================
    ``linear``              ``(out, in)``         axis 0, rows; bias too          axis 1, columns
    ``conv1d`` (GPT-2's     ``(in, out)``         axis 1, columns; bias too       axis 0, rows
    Conv1D, fan_in_fan_out)
    ``conv`` (Conv2d/3d)    ``(out, in/g, k…)``   axis 0, output channels; bias   axis 1, input channels
                                                  too                             (of each group)
    ======================  ====================  ==============================  =========================
    """
    if layer == "linear":
        return (1, "columns") if feedforward else (0, "rows")
    if layer == "conv1d":
        return (0, "rows") if feedforward else (1, "columns")
    return (1, "input channels") if feedforward else (0, "output channels")


@dataclass(frozen=True)
class VectorFold:
    """One vector folded into one weight (and, for non-feed-forward layers, its bias).

    ``axis`` is the weight axis the vector runs along: 0 scales rows / output channels, 1 scales
    columns / input channels. ``groups`` > 1 only for a feed-forward vector on a grouped conv,
    where input channel ``c`` of group ``g`` is scaled by ``vector[g * in_per_group + c]``.
    """

    module: str  # module name in the adapter's namespace
    weight: str  # base tensor name
    bias: str | None
    layer: str  # "linear", "conv1d" (transposed, fan_in_fan_out), "conv2d", "conv3d"
    feedforward: bool
    axis: int
    groups: int
    length: int

    @property
    def scales(self) -> str:
        """What the vector scales: rows, columns, output channels or input channels."""
        return orientation(self.layer if self.layer in ("linear", "conv1d") else "conv", self.feedforward)[1]

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape the vector takes to broadcast against the weight (grouped convs expand first)."""
        shape = [1] * len(weight_shape)
        if self.groups > 1:
            shape[0], shape[1] = weight_shape[0], weight_shape[1]
        else:
            shape[self.axis] = self.length
        return tuple(shape)

    def scale(self, vector: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """The vector arranged to multiply the weight elementwise (PEFT's layout, made explicit)."""
        if self.groups > 1:
            out, per_group = weight_shape[0], weight_shape[1]
            g = self.groups
            expanded = np.broadcast_to(vector.reshape(g, 1, per_group), (g, out // g, per_group))
            return expanded.reshape(self.scale_shape(weight_shape))
        return vector.reshape(self.scale_shape(weight_shape))


@dataclass(frozen=True)
class HeadCopy:
    """A ``modules_to_save`` tensor that replaces a base tensor (``replaces`` set) or is added."""

    name: str  # parameter name in the adapter's namespace
    key: str  # adapter tensor key
    replaces: str | None  # base tensor name
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    code: str
    message: str
    module: str | None = None

    def line(self) -> str:
        where = f"{self.module}: " if self.module else ""
        return printable(f"{self.severity}: {where}{self.message}")


@dataclass
class FoldPlan:
    names: NameMap
    folds: list[VectorFold] = field(default_factory=list)
    heads: list[HeadCopy] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Notice]:
        return [Notice(f.code, f.message, f.module) for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def require_fit(self, adapter_path) -> None:
        """Raise the first error (and how many more) when the adapter does not fit; merge and
        verify refuse to work on such a plan."""
        if self.errors:
            first = self.errors[0].line().removeprefix("error: ")
            more = f" (and {len(self.errors) - 1} more; run `ia3tools check`)" if len(self.errors) > 1 else ""
            raise PlanError(f"adapter does not fit the base: {first}{more}", path=adapter_path)

    def by_base_tensor(self) -> dict[str, tuple[VectorFold, str]]:
        """Base tensor name -> (fold, "weight" or "bias") for every tensor a vector touches."""
        touched: dict[str, tuple[VectorFold, str]] = {}
        for fold in self.folds:
            touched[fold.weight] = (fold, "weight")
            if fold.bias:
                touched[fold.bias] = (fold, "bias")
        return touched

    def output_name(self, base_name: str) -> str:
        """Name of a base tensor in the merged output."""
        return self.names.output_name(base_name)

    def head_output(self, head: HeadCopy) -> str:
        """Name of a head tensor in the merged output."""
        return self.names.output_name(head.replaces) if head.replaces else self.names.added_output(head.name)


def build_plan(base: Checkpoint, adapter: Adapter, vocab_size: int | None = None) -> FoldPlan:
    """Match every vector and head tensor of ``adapter`` to ``base``; never raises for a misfit,
    records it as a finding instead (so ``check`` can list them all). ``vocab_size`` (the base
    config's) lets a modules_to_save embedding or output head carry a resized vocabulary."""
    index = BaseNames(base.tensors)
    names = NameMap.infer(index, list(adapter.vectors) + list(adapter.heads))
    plan = FoldPlan(names)
    err = _reporter(plan, "error")
    warn = _reporter(plan, "warning")
    for notice in base.warnings:
        warn(notice.code, notice.message)

    _check_config(plan, base, adapter, err, warn)
    for module, vector in adapter.vectors.items():
        fold = _plan_vector(plan, base, index, adapter, module, vector, err)
        if fold is not None:
            plan.folds.append(fold)
    for name in adapter.heads:
        _plan_head(plan, base, index, adapter, name, err, vocab_size)

    seen: dict[str, str] = {}
    for fold in plan.folds:
        if fold.weight in seen:
            err("double-fold", f"folds into {fold.weight}, which {seen[fold.weight]} also folds into", fold.module)
        seen[fold.weight] = fold.module
    for head in plan.heads:
        if head.replaces in seen:
            err("head-conflict", f"modules_to_save replaces {head.replaces}, which a vector folds into", head.name)
    names.finish(added_heads=any(h.replaces is None for h in plan.heads))
    return plan


def _reporter(plan: FoldPlan, severity: str):
    def report(code: str, message: str, module: str | None = None) -> None:
        plan.findings.append(Finding(severity, code, message, module))

    return report


def _check_config(plan, base: Checkpoint, adapter: Adapter, err, warn) -> None:
    config = adapter.config
    base_names = base_modules(base.tensors)
    modules = [plan.names.to_adapter(m) for m in base_names]
    targets, ff = config.target_modules, config.feedforward_modules
    if isinstance(targets, list):
        for t in ModuleNames(targets, "dot").unmatched(modules):
            err("unmatched-target", f"target_modules entry {t!r} matches no module of the base")
    elif not config.all_linear and not any(config.is_target(m) for m in modules):
        err("unmatched-target", f"target_modules regex {targets!r} matches no module of the base")
    if isinstance(ff, list) and isinstance(targets, list):
        listed = set(targets)
        for f in ff:
            if f not in listed:
                err("feedforward-not-target", f"feedforward_modules entry {f!r} is not in target_modules")

    missing = []
    for base_module, m in zip(base_names, modules):
        if (
            m not in adapter.vectors
            and config.is_target(m)
            and config.saved_module_of(m) is None
            and len(base.tensors[f"{base_module}.weight"].shape) in _LAYERS
        ):
            missing.append(m)
    if missing and not config.all_linear:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        warn("no-vector", f"{len(missing)} base module(s) match target_modules but have no vector: {shown}")


def _plan_vector(plan, base: Checkpoint, index: BaseNames, adapter: Adapter, module: str, vector: np.ndarray, err):
    config = adapter.config
    found = resolve(f"{module}.weight", index, plan.names)
    if isinstance(found, list):
        if not found:
            err("missing-module", f"no weight {module}.weight (or across a backbone prefix) in the base", module)
        else:
            err("ambiguous-module", f"matches several base weights: {', '.join(found)}", module)
        return None
    weight = base.tensors[found]
    vshape = tuple(vector.shape)
    bad = int(np.count_nonzero(~np.isfinite(vector)))
    if bad:
        nans = int(np.count_nonzero(np.isnan(vector)))
        err("non-finite", f"vector has {nans} NaN and {bad - nans} Inf entries", module)
    if not config.is_target(module):
        err("not-target", "vector for a module that target_modules does not match", module)
    if not DTYPES[weight.dtype].foldable:
        err("dtype", f"weight {found} is {weight.dtype}; only F16, BF16, F32 and F64 can be folded", module)
        return None
    layer = _LAYERS.get(len(weight.shape))
    if layer is None:
        err("layer", f"weight {found} has shape {list(weight.shape)}; IA3 folds into 2-D, 4-D or 5-D weights", module)
        return None
    feedforward = config.is_feedforward(module)
    if layer == "linear":
        spec = _linear(module, vshape, weight.shape, feedforward, config.fan_in_fan_out, err)
        if config.fan_in_fan_out:
            layer = "conv1d"
    else:
        spec = _conv(module, vshape, weight.shape, feedforward, err)
    if spec is None:
        return None
    axis, groups, length = spec
    bias = None
    if not feedforward:
        bias_name = found[: -len("weight")] + "bias"
        if bias_name in base.tensors:
            bias = bias_name
            if base.tensors[bias_name].shape != (length,):
                err("bias-shape", f"bias {bias_name} has shape {list(base.tensors[bias_name].shape)}, expected [{length}]", module)
            if not DTYPES[base.tensors[bias_name].dtype].foldable:
                err("dtype", f"bias {bias_name} is {base.tensors[bias_name].dtype} and cannot be folded", module)
    return VectorFold(module, found, bias, layer, feedforward, axis, groups, length)


def _linear(module, vshape, wshape, feedforward, fan_in_fan_out, err):
    if len(vshape) != 2 or 1 not in vshape:
        err("vector-shape", f"vector shape {list(vshape)} is neither (out, 1) nor (1, in)", module)
        return None
    length = vshape[0] * vshape[1]
    if vshape != (1, 1):
        shape_says_ff = vshape[0] == 1
        if shape_says_ff != feedforward:
            said = "(1, in): scales inputs, feed-forward" if shape_says_ff else "(out, 1): scales outputs"
            cfg = "matches" if feedforward else "does not match"
            err("orientation", f"vector shape {list(vshape)} is {said}, but feedforward_modules {cfg} it", module)
            return None
    axis = orientation("conv1d" if fan_in_fan_out else "linear", feedforward)[0]
    if wshape[axis] != length:
        if wshape[1 - axis] == length:
            err(
                "fan-in-fan-out",
                f"vector of length {length} fits weight {list(wshape)} only transposed: "
                f"fan_in_fan_out is {str(fan_in_fan_out).lower()} but the weight is stored the other way",
                module,
            )
        else:
            err("vector-length", f"vector length {length} does not fit weight shape {list(wshape)}", module)
        return None
    return axis, 1, length


def _conv(module, vshape, wshape, feedforward, err):
    expected = (1, vshape[1] if len(vshape) > 1 else 0) + (1,) * (len(wshape) - 2)
    if vshape != expected:
        err("vector-shape", f"vector shape {list(vshape)} is not (1, channels{', 1' * (len(wshape) - 2)})", module)
        return None
    length = vshape[1]
    if not feedforward:
        if wshape[0] != length:
            err("vector-length", f"vector length {length} does not match {wshape[0]} output channels", module)
            return None
        return orientation("conv", False)[0], 1, length
    per_group = wshape[1]
    if per_group == 0 or length % per_group or wshape[0] % (length // per_group):
        err("vector-length", f"vector length {length} does not fit conv weight {list(wshape)} as input channels", module)
        return None
    return orientation("conv", True)[0], length // per_group, length


def _plan_head(plan, base: Checkpoint, index: BaseNames, adapter: Adapter, name: str, err, vocab_size) -> None:
    info = adapter.heads[name]
    found = resolve(name, index, plan.names)
    if isinstance(found, list) and found:
        err("ambiguous-module", f"modules_to_save tensor matches several base tensors: {', '.join(found)}", name)
        return
    if isinstance(found, str):
        shape = base.tensors[found].shape
        resized_vocab = (vocab_size is not None and len(shape) == 2 and len(info.shape) == 2 and shape[0] == vocab_size
                         and shape[1] == info.shape[1])  # embeddings resized for added tokens
        if shape != info.shape and not resized_vocab:
            err("head-shape", f"modules_to_save tensor has shape {list(info.shape)}, base {found} has {list(shape)}", name)
            return
        plan.heads.append(HeadCopy(name, info.key, found, info.shape))
    else:
        plan.heads.append(HeadCopy(name, info.key, None, info.shape))
