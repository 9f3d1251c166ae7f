"""``merge``: fold an adapter into its base checkpoint, tensor by tensor, into a standard Hugging
Face model directory, published atomically.

Tensors no vector touches are copied as raw bytes in the kernel; folded tensors are streamed in
row blocks; so memory stays flat whatever the model or shard size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ia3tools import __version__
from ia3tools.assemble import Assembly, assemble
from ia3tools.commands.check import PlanSummary, summarise
from ia3tools.errors import OptionError
from ia3tools.fold import make_folder
from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.formats.config import CONFIG_NAME, read_model_config
from ia3tools.formats.dtypes import DTYPES, FRIENDLY
from ia3tools.model_config import retargeted_config
from ia3tools.plan import build_plan
from ia3tools.publish import Staging, check_output_path
from ia3tools.reports import Report, ShardRow
from ia3tools.write import OutTensor, copy_side_files, validate_checkpoint, write_index, write_safetensors

@dataclass(frozen=True)
class MergeOptions:
    """How to merge. ``dtype`` takes bf16/fp16/fp32 (or their long names); ``max_shard_size``
    bytes or a size such as "2GB"."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto"
    dtype: str | None = None  # convert floating tensors to this dtype; None keeps each tensor's own
    max_shard_size: int | str | None = None  # None keeps the base's shard layout
    dry_run: bool = False
    force: bool = False
    progress: bool = False  # a progress bar on stderr (when it is a terminal)
    durable: bool = True  # fsync before publishing; False trades power-loss safety for cp-like speed

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            if self.dtype.lower() not in FRIENDLY:
                raise OptionError(f"dtype {self.dtype!r}: expected bf16, fp16 or fp32")
            object.__setattr__(self, "dtype", FRIENDLY[self.dtype.lower()])
        if isinstance(self.max_shard_size, str):
            try:
                object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
            except ValueError as exc:
                raise OptionError(str(exc)) from None
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise OptionError(f"device {self.device!r}: expected cpu, cuda, cuda:N or auto")


@dataclass
class MergeReport(Report):
    command: ClassVar[str] = "merge"
    output: str | None
    base: str
    adapter: str
    adapter_sha256: str
    tool: str
    device: str
    dtype: str  # the dtype converted to, or "kept"
    tensors: int
    folded: int
    heads_replaced: int
    heads_added: int
    shards: list[ShardRow]
    bytes: int
    dry_run: bool
    plan: PlanSummary | None = None  # the plan, for a dry run
    seconds: float | None = None


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10GiB' or a plain byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 2GB or 500MB)") from None
    if unit not in units or not math.isfinite(value) or value <= 0 or value * units[unit] < 1:
        raise ValueError(f"not a size: {text!r} (try 2GB or 500MB)")
    return int(value * units[unit])


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike | None = None,
          options: MergeOptions | None = None) -> MergeReport:
    """Fold ``adapter`` into ``base`` and write the merged model to ``out`` (None only for a dry
    run). Everything is validated before a byte is written; failures raise ``Ia3Error``."""
    options = options or MergeOptions()
    started = time.perf_counter()
    base, adapter_path = Path(base), Path(adapter)
    out = Path(out) if out is not None else None
    if out is None and not options.dry_run:
        raise OptionError("no output directory given (required unless dry_run)")
    with contextlib.ExitStack() as inputs:
        ckpt = inputs.enter_context(contextlib.closing(open_checkpoint(base)))
        ad = inputs.enter_context(contextlib.closing(read_adapter(adapter_path)))
        plan = build_plan(ckpt, ad)
        plan.require_fit(adapter_path)
        base_config = read_model_config(ckpt.path) if ckpt.path.is_dir() else None  # strict, even if unused
        notes = check_output_path(out, [base, adapter_path], options.force) if out is not None else []
        folder = make_folder(options.device)
        assembly = assemble(ckpt, ad, plan, folder, _dtype_rule(options.dtype))
        layout = _layout(ckpt, assembly, options.max_shard_size)
        added = [t.shape for t in assembly.all_tensors() if t.name in assembly.added]
        config = retargeted_config(ckpt.path, base_config, ad, plan, added)  # checked before writing
        total = sum(t.nbytes for t in assembly.all_tensors())
        report = MergeReport(
            str(out) if out is not None else None, str(base), str(adapter_path), ad.sha256(), f"ia3tools {__version__}",
            folder.device, options.dtype or "kept", len(assembly.all_tensors()), len(assembly.folded),
            len(assembly.replaced), len(assembly.added),
            [ShardRow(n, len(ts), sum(t.nbytes for t in ts)) for n, ts in layout.items()], total, options.dry_run,
            warnings=plan.warnings + notes)
        if options.dry_run:
            report.plan = summarise(plan)
            return report
        metadata = {
            "format": "pt",
            "ia3tools_version": __version__,
            "ia3tools_adapter_sha256": report.adapter_sha256,
            "ia3tools_adapter": adapter_path.resolve().name,
        }
        with Staging(out, options.force, durable=options.durable) as staging:
            _write_weights(staging.path, layout, metadata, total, options.progress, options.durable)
            if ckpt.path.is_dir():
                copy_side_files(ckpt.path, staging.path)
            if config is not None:
                (staging.path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            staging.publish(validate_checkpoint)
        report.warnings += staging.notes
        report.seconds = round(time.perf_counter() - started, 3)
        return report


def _dtype_rule(dtype: str | None):
    if dtype is None:
        return lambda ref: ref.dtype
    return lambda ref: dtype if DTYPES[ref.dtype].foldable else ref.dtype


def _layout(ckpt, assembly: Assembly, max_shard_size: int | None) -> dict[str, list[OutTensor]]:
    """Output file name -> tensors. By default the base's shards, renamed to safetensors."""
    if max_shard_size is None:
        groups = list(assembly.shards.values())
    else:
        groups, current, size = [], [], 0
        for t in assembly.all_tensors():
            if current and size + t.nbytes > max_shard_size:
                groups.append(current)
                current, size = [], 0
            current.append(t)
            size += t.nbytes
        groups.append(current)
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    if max_shard_size is None and ckpt.format == "safetensors":
        return dict(zip(assembly.shards, groups))
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_weights(directory: Path, layout, metadata: dict, total: int, progress: bool, durable: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None if progress else True, leave=False)
    with bar:
        for name, tensors in layout.items():
            write_safetensors(directory / name, tensors, metadata, progress=bar.update, durable=durable)
    if len(layout) > 1:
        weight_map = {t.name: name for name, tensors in layout.items() for t in tensors}
        index_meta = {"total_size": total, **metadata}
        write_index(directory / "model.safetensors.index.json", weight_map, index_meta)
