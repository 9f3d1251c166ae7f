"""Runtime adapter slots: one ONNX base whose IA3 vectors are switched per run.

A slot is a float32 vector, 1-D of a module's scaled length, multiplied in where PEFT multiplies:
on the output of a non-feed-forward module, bias included (``(Wx + b)·l``), on the input of a
feed-forward one (``W(x·l) + b``); along the last axis for Linear and GPT-2's Conv1D, along the
channels for Conv2d/3d. Each slot is a graph input that is also an initializer of the same name,
all ones, so that with no adapter active the model is exactly the base, and onnxruntime's adapter
format (``OUT/adapters/<name>.onnx_adapter``) overrides any subset of them per run.

The vectors enter the torch model as forward arguments (hooks read them from a holder the
wrapper fills): registered as buffers, the exporter would fold identical all-ones vectors into
shared constants and the slots would be lost. The defaults are added to the graph after export.

Which vector goes where is ``ia3tools.plan``'s decision, exactly as for ``merge``; the slots'
description is kept in the graph's metadata (``METADATA_KEY``), so ``onnx-adapter`` can check an
adapter against an export without the base checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ia3tools.errors import ExportError, OptionError
from ia3tools.formats.checkpoint import Checkpoint, TensorRef
from ia3tools.formats.dtypes import DTYPES
from ia3tools.plan import VectorFold, build_plan

SLOT_SUFFIX = ".ia3_l"
METADATA_KEY = "ia3tools.slots"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass(frozen=True)
class Slot:
    """One switchable vector: graph input ``name``, scaling base tensor ``weight`` (and ``bias``)."""

    name: str
    weight: str  # the base checkpoint's tensor name
    weight_shape: tuple[int, ...]
    dtype: str
    bias: str | None
    layer: str  # linear, conv1d (GPT-2's, fan_in_fan_out), conv2d, conv3d
    feedforward: bool  # scales the inputs (else the outputs, bias included)
    length: int

    @property
    def scales(self) -> str:
        return "inputs" if self.feedforward else "outputs"


@dataclass
class RuntimeAdapter:
    """One adapter as runtime parameters: ``values`` (slot name -> float32 ``[n]``) and, for the
    torch reference, the plan's folds with their vectors."""

    name: str  # the adapter directory's name: OUT/adapters/<name>.onnx_adapter
    path: Path
    values: dict[str, np.ndarray]
    folds: list[tuple[VectorFold, np.ndarray]]


def slot_name(weight: str) -> str:
    return weight.removesuffix(".weight") + SLOT_SUFFIX


def _slot_of(fold: VectorFold, base: Checkpoint) -> Slot:
    ref = base.tensors[fold.weight]
    return Slot(slot_name(fold.weight), fold.weight, tuple(ref.shape), ref.dtype,
                fold.bias if not fold.feedforward else None, fold.layer, fold.feedforward, fold.length)


def _runtime_adapter(path: Path, base: Checkpoint, shown) -> tuple[RuntimeAdapter, list[Slot]]:
    """Read and plan one adapter against ``base`` (a checkpoint, or an export's slots)."""
    from ia3tools.formats.adapter import read_adapter

    adapter = read_adapter(path)
    try:
        plan = build_plan(base, adapter)
        if plan.errors:
            first = plan.errors[0].line().removeprefix("error: ")
            more = f" (and {len(plan.errors) - 1} more)" if len(plan.errors) > 1 else ""
            raise ExportError(f"adapter does not fit {shown}: {first}{more}", path=path)
        if plan.heads:
            raise ExportError(f"modules_to_save ({plan.heads[0].name}) cannot be switched at run time: a runtime "
                              "adapter holds IA3 vectors only (export-onnx --adapter merges such an adapter)", path=path)
        folds = [(fold, adapter.vectors[fold.module].astype(np.float32).reshape(-1)) for fold in plan.folds]
    finally:
        adapter.close()
    slots = [_slot_of(fold, base) for fold, _ in folds]
    # ravel: PEFT stores (n, 1) or (1, n); onnxruntime's adapters need [n] ("Invalid rank" otherwise)
    values = {s.name: np.ascontiguousarray(v) for s, (_, v) in zip(slots, folds)}
    return RuntimeAdapter(Path(path).name, Path(path), values, folds), slots


def plan_slots(base: Checkpoint, paths: list[Path], shown) -> tuple[list[Slot], list[RuntimeAdapter]]:
    """The slots the adapters at ``paths`` need (one per module any of them targets, in the base's
    tensor order) and each adapter's parameters. Refuses two adapters of one name, and two that
    scale one module on different sides (a slot has one)."""
    names = [Path(p).name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OptionError(f"two runtime adapters are named {twice[0]!r}: each becomes adapters/<name>{ADAPTER_SUFFIX}")
    slots: dict[str, tuple[Slot, Path]] = {}
    adapters = []
    for path in paths:
        adapter, wanted = _runtime_adapter(Path(path), base, shown)
        for slot in wanted:
            seen = slots.setdefault(slot.weight, (slot, Path(path)))
            if seen[0] != slot:
                raise ExportError(f"{slot.weight}: this adapter scales its {slot.scales}, {seen[1]} its "
                                  f"{seen[0].scales}; one slot scales one side", path=path)
        adapters.append(adapter)
    order = {name: i for i, name in enumerate(base.tensors)}
    return sorted((s for s, _ in slots.values()), key=lambda s: order[s.weight]), adapters


# --- the torch side -------------------------------------------------------------------------


def _parameter(model, tensor: str):
    """The model's parameter for a checkpoint tensor name (transformers may add or drop the base
    model's prefix when it loads a checkpoint)."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "")
    for name in (tensor, f"{prefix}.{tensor}", tensor.partition(".")[2]):
        if name in params:
            return name, params[name]
    raise ExportError(f"the loaded model has no parameter for tensor {tensor}")


def install(model, slots: list[Slot]) -> dict:
    """Hooks multiplying each slot's vector in; returns the holder they read (slot name ->
    tensor, all ones until the wrapper fills it with the graph's inputs)."""
    import torch

    holder = {s.name: torch.ones(s.length) for s in slots}
    modules = dict(model.named_modules())
    for slot in slots:
        module = modules[_parameter(model, slot.weight)[0].rpartition(".")[0]]
        channels = slot.layer in ("conv2d", "conv3d")

        def shaped(vector, like, channels=channels):
            return vector.reshape((1, -1) + (1,) * (like.dim() - 2)) if channels else vector

        if slot.feedforward:
            def before(module, args, name=slot.name, shaped=shaped):
                return (args[0] * shaped(holder[name], args[0]),) + tuple(args[1:])

            module.register_forward_pre_hook(before)
        else:
            def after(module, args, output, name=slot.name, shaped=shaped):
                return output * shaped(holder[name], output)

            module.register_forward_hook(after)
    return holder


@contextlib.contextmanager
def folded(model, adapter: RuntimeAdapter):
    """The model with ``adapter`` folded into its weights, as merge folds (weight and, for outputs,
    bias times the vector in float32), restored on exit: the reference the runtime adapter must
    match, computed without the slots."""
    import torch

    saved = []
    with torch.no_grad():
        try:
            for fold, vector in adapter.folds:
                _, weight = _parameter(model, fold.weight)
                saved.append((weight, weight.detach().clone()))
                weight.mul_(torch.from_numpy(fold.scale(vector, tuple(weight.shape)).copy()))
                if fold.bias and not fold.feedforward:
                    _, bias = _parameter(model, fold.bias)
                    saved.append((bias, bias.detach().clone()))
                    bias.mul_(torch.from_numpy(vector.copy()))
            yield model
        finally:
            for tensor, original in reversed(saved):
                tensor.copy_(original)


# --- the graph side -------------------------------------------------------------------------


def add_defaults(ir_model, slots: list[Slot]) -> None:
    """Give each slot input an all-ones initializer of its name (an input without one is required,
    and an initializer that is not an input cannot be overridden), and record the slots."""
    import onnx_ir as ir

    inputs = {v.name: v for v in ir_model.graph.inputs}
    for slot in slots:
        value = inputs.get(slot.name)
        if value is None:
            raise ExportError(f"the exported graph lost the input for slot {slot.name}")
        value.const_value = ir.tensor(np.ones(slot.length, np.float32), name=slot.name)
        ir_model.graph.register_initializer(value)
    ir_model.metadata_props[METADATA_KEY] = json.dumps([asdict(s) for s in slots])


def read_slots(onnx_path: Path) -> list[Slot]:
    """The slots an export records (without loading its weights); refuses an export without."""
    import onnx

    header = onnx.load(str(onnx_path), load_external_data=False)
    raw = next((p.value for p in header.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        raise ExportError("this export has no runtime adapter slots (export it with --runtime-adapters)",
                          path=onnx_path)
    try:
        return [Slot(**{**s, "weight_shape": tuple(s["weight_shape"])}) for s in json.loads(raw)]
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"unreadable {METADATA_KEY} metadata ({exc})", path=onnx_path) from None


def slots_checkpoint(slots: list[Slot], onnx_path: Path) -> Checkpoint:
    """The base tensors the slots scale, as a weightless checkpoint to plan an adapter against."""
    tensors = {}
    for s in slots:
        size = DTYPES[s.dtype].bits // 8
        n = int(np.prod(s.weight_shape))
        tensors[s.weight] = TensorRef(s.weight, s.dtype, s.weight_shape, n * size, onnx_path.name)
        if s.bias:
            tensors[s.bias] = TensorRef(s.bias, s.dtype, (s.length,), s.length * size, onnx_path.name)
    return Checkpoint(onnx_path, "onnx", False, {}, tensors)


def check_against(adapter: RuntimeAdapter, slots: list[Slot]) -> None:
    """Every vector of ``adapter`` (planned against ``slots_checkpoint``, which already refused one
    without a slot or of another length) scales the same side of the same layout (fan_in_fan_out)
    as its slot."""
    by_weight = {s.weight: s for s in slots}
    for fold, _ in adapter.folds:
        slot = by_weight[fold.weight]
        if fold.feedforward != slot.feedforward:
            raise ExportError(f"{fold.module} scales its {'inputs' if fold.feedforward else 'outputs'}, the export's "
                              f"slot {slot.name} its {slot.scales} (feedforward_modules differ)", path=adapter.path)
        if fold.layer != slot.layer:
            raise ExportError(f"{fold.module} is folded as {fold.layer}, the export's slot {slot.name} as "
                              f"{slot.layer} (fan_in_fan_out differs)", path=adapter.path)


def write_adapter_file(path: Path, values: dict[str, np.ndarray]) -> None:
    """``values`` in onnxruntime's adapter format at ``path``. The arrays stay referenced here
    until the file is written: onnxruntime's OrtValues do not own them."""
    import onnxruntime as ort

    arrays = {name: np.ascontiguousarray(v, np.float32).reshape(-1) for name, v in values.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})
    fmt.export_adapter(str(path))
    del arrays
