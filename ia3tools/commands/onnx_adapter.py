"""``onnx-adapter``: add IA3 adapters to an export made with ``--runtime-adapters``, later.

Each adapter is planned against the slots the export records (its ``model.onnx`` metadata), as
merge plans a fold against a base: every vector needs a slot of its length that scales the same
side (``feedforward_modules``) of the same layout (``fan_in_fan_out``). The files are written
beside the export's own (``OUT/adapters/<adapter directory name>.onnx_adapter``), each run once
in onnxruntime with the export's graph, then moved into place: all of them or none.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ia3tools.atomic import rename_noreplace
from ia3tools.errors import ExportError, OptionError, OutputError, require
from ia3tools.exporting.runtime import AdapterFile, adapter_path, write_adapters
from ia3tools.exporting.slots import ADAPTERS_DIR, check_against, plan_slots, read_slots, slots_checkpoint
from ia3tools.publish import fsync_dir
from ia3tools.reports import Report


@dataclass(frozen=True)
class OnnxAdapterOptions:
    force: bool = False  # replace an adapter file of the same name


@dataclass
class OnnxAdapterReport(Report):
    command: ClassVar[str] = "onnx-adapter"
    output: str  # the export directory
    adapters: list[AdapterFile] = field(default_factory=list)
    slots: int = 0  # the export's


def onnx_adapter(adapters: list[str | os.PathLike], export: str | os.PathLike,
                 options: OnnxAdapterOptions | None = None) -> OnnxAdapterReport:
    """Write ``export/adapters/<name>.onnx_adapter`` for each IA3 adapter directory in
    ``adapters``, checked against the export's slots and run once in onnxruntime."""
    options = options or OnnxAdapterOptions()
    for module in ("onnx", "onnxruntime"):
        require(module, "onnx", "onnx-adapter")
    if not adapters:
        raise OptionError("give at least one adapter")
    export = Path(export)
    onnx_path = export / "model.onnx"
    if not onnx_path.is_file():
        raise ExportError("not an ONNX export (no model.onnx in it)", path=export)
    slots = read_slots(onnx_path)
    _, planned = plan_slots(slots_checkpoint(slots, onnx_path), [Path(a) for a in adapters], f"the slots of {export}")
    for adapter in planned:
        check_against(adapter, slots)
        target = adapter_path(export, adapter.name)
        if os.path.lexists(target) and not options.force:
            raise OutputError("adapter file already exists (use --force to replace it)", path=target,
                              code="output-exists")
    scratch = export / ADAPTERS_DIR / f".ia3tools-{os.getpid()}.tmp"
    try:
        (export / ADAPTERS_DIR).mkdir(exist_ok=True)
        scratch.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write adapters here ({exc.strerror})", path=export / ADAPTERS_DIR) from None
    try:
        files = write_adapters(scratch, planned)
        _run_each(onnx_path, scratch, planned)
        for adapter, file in zip(planned, files):
            _move(adapter_path(scratch, adapter.name), adapter_path(export, adapter.name), options.force)
            file.file = f"{ADAPTERS_DIR}/{adapter_path(export, adapter.name).name}"
        fsync_dir(export / ADAPTERS_DIR)
    finally:
        for leftover in scratch.rglob("*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(scratch / ADAPTERS_DIR)
            os.rmdir(scratch)
    return OnnxAdapterReport(str(export), files, len(slots))


def _run_each(onnx_path: Path, directory: Path, planned) -> None:
    """One run of the export's graph with each adapter active: onnxruntime accepts its names and
    shapes only when it applies them."""
    import numpy as np
    import onnxruntime as ort

    from ia3tools.exporting.parity import session

    sess = session(onnx_path)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (1 if axis == 0 else 4) for axis, d in enumerate(i.shape)]
        feed[i.name] = np.ones(shape, np.int64) if "int" in i.type else np.zeros(shape, np.float32)
    for adapter in planned:
        loaded = ort.LoraAdapter()
        try:
            loaded.Load(str(adapter_path(directory, adapter.name)))
            run_options = ort.RunOptions()
            run_options.add_active_adapter(loaded)
            sess.run(None, feed, run_options)
        except Exception as exc:  # onnxruntime's errors share no base class
            raise ExportError(f"onnxruntime refuses the adapter on {onnx_path}: {str(exc).strip().splitlines()[0]}",
                              path=adapter.path) from None


def _move(src: Path, dst: Path, force: bool) -> None:
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    try:
        if force:
            os.replace(src, dst)
        else:
            rename_noreplace(src, dst)
    except FileExistsError:
        raise OutputError("adapter file appeared meanwhile (use --force to replace it)", path=dst,
                          code="output-exists") from None
