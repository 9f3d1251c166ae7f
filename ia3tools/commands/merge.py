"""``merge``: fold an adapter into its base checkpoint, tensor by tensor, into a standard Hugging
Face model directory, published atomically.

Tensors no vector touches are copied as raw bytes in the kernel; folded tensors are streamed in
row blocks; so memory stays flat whatever the model or shard size.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ia3tools import __version__
from ia3tools.assemble import Assembly, assemble
from ia3tools.commands.check import PlanSummary, base_vocab_size, summarise
from ia3tools.errors import OptionError
from ia3tools.fold import make_folder
from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.card import base_model_id, merge_card, read_card_metadata
from ia3tools.errors import Notice
from ia3tools.formats.config import read_model_config
from ia3tools.formats.hub import base_of, locate
from ia3tools.formats.sentence import read_sentence_model
from ia3tools.formats.dtypes import DTYPES, FRIENDLY
from ia3tools.model_files import choose_tokenizer, merged_config, resized_vocab, write_model_files
from ia3tools.plan import build_plan
from ia3tools.publish import Staging, check_output_path
from ia3tools.reports import Report, ShardRow
from ia3tools.write import OutTensor, validate_checkpoint, write_index, write_safetensors

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
    tokenizer_from: str | None = None  # "base" or "adapter"; None: the adapter's when it has one

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
    base_id: str | None = None  # the base's hub id, when known
    tokenizer_from: str | None = None  # whose tokenizer the merged model ships: base, adapter, or none
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


def merge(base: str | os.PathLike | None, adapter: str | os.PathLike, out: str | os.PathLike | None = None,
          options: MergeOptions | None = None) -> MergeReport:
    """Fold ``adapter`` into ``base`` and write the merged model to ``out`` (None only for a dry
    run). ``base`` is a directory, a hub id in the local cache, or None for the one the adapter
    names. Everything is validated before a byte is written; failures raise ``Ia3Error``."""
    options = options or MergeOptions()
    started = time.perf_counter()
    adapter_path = Path(adapter)
    out = Path(out) if out is not None else None
    if out is None and not options.dry_run:
        raise OptionError("no output directory given (required unless dry_run)")
    with contextlib.ExitStack() as inputs:
        ad = inputs.enter_context(contextlib.closing(read_adapter(adapter_path)))
        located = locate(base) if base is not None else base_of(ad.config)
        base_root = located.path
        sentence = read_sentence_model(base_root) if base_root.is_dir() else None
        weights_dir = sentence.transformer_dir if sentence else base_root
        ckpt = inputs.enter_context(contextlib.closing(open_checkpoint(base_root)))
        base_config = read_model_config(weights_dir) if weights_dir.is_dir() else None  # strict, even if unused
        vocab_size = base_vocab_size(ckpt)
        plan = build_plan(ckpt, ad, vocab_size)
        plan.require_fit(adapter_path)
        notes = check_output_path(out, [base_root, adapter_path], options.force) if out is not None else []
        folder = make_folder(options.device)
        assembly = assemble(ckpt, ad, plan, folder, _dtype_rule(options.dtype))
        layout = _layout(ckpt, assembly, options.max_shard_size)
        added = [t.shape for t in assembly.all_tensors() if t.name in assembly.added]
        vocab = resized_vocab(plan, vocab_size, ckpt.tensors)
        config = merged_config(weights_dir, base_config, ad, plan, added, options.dtype, vocab)  # before writing
        tokenizer = choose_tokenizer(weights_dir if weights_dir.is_dir() else None, adapter_path, options.tokenizer_from)
        if vocab and tokenizer.source != "adapter":
            notes.append(Notice("resized-without-tokenizer", f"modules_to_save resizes the vocabulary to {vocab} "
                                "tokens, but the adapter carries no tokenizer: the base's is shipped",
                                file=str(adapter_path)))
        total = sum(t.nbytes for t in assembly.all_tensors())
        report = MergeReport(
            str(out) if out is not None else None, str(base_root), str(adapter_path), ad.sha256(),
            f"ia3tools {__version__}", folder.device, options.dtype or "kept", len(assembly.all_tensors()),
            len(assembly.folded), len(assembly.replaced), len(assembly.added),
            [ShardRow(n, len(ts), sum(t.nbytes for t in ts)) for n, ts in layout.items()], total, options.dry_run,
            base_id=located.hub_id, tokenizer_from=tokenizer.source, warnings=plan.warnings + notes)
        if options.dry_run:
            report.plan = summarise(plan)
            return report
        metadata = {
            "format": "pt",
            "ia3tools_version": __version__,
            "ia3tools_adapter_sha256": report.adapter_sha256,
            "ia3tools_adapter": adapter_path.resolve().name,
        }
        base_card = read_card_metadata(base_root) or read_card_metadata(weights_dir)
        card = merge_card(name=out.name, base_id=base_model_id(located.hub_id, ad.config.base_model_name_or_path,
                                                               base_card, base_root),
                          base_card=base_card, adapter=adapter_path.resolve().name, adapter_sha256=report.adapter_sha256,
                          library="sentence-transformers" if sentence else "transformers",
                          command=_command(base, adapter_path, out, options), dtype=report.dtype,
                          tokenizer_from=tokenizer.source)
        with Staging(out, options.force, durable=options.durable) as staging:
            weights_out = staging.path / weights_dir.relative_to(base_root) if sentence else staging.path
            weights_out.mkdir(parents=True, exist_ok=True)
            _write_weights(weights_out, layout, metadata, total, options.progress, options.durable)
            write_model_files(base_root, weights_dir, weights_out, staging.path, sentence, tokenizer, config, card)
            staging.publish(validate_checkpoint)
        report.warnings += staging.notes
        report.seconds = round(time.perf_counter() - started, 3)
        return report


def _command(base, adapter: Path, out: Path, options: MergeOptions) -> str:
    """The command line that makes this merge (for its model card)."""
    parts = [*([os.fspath(base)] if base is not None else []), os.fspath(adapter), "-o", os.fspath(out)]
    if options.dtype:
        parts += ["--dtype", {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(options.dtype, options.dtype)]
    if options.max_shard_size:
        parts += ["--max-shard-size", str(options.max_shard_size)]
    if options.tokenizer_from:
        parts += ["--tokenizer-from", options.tokenizer_from]
    return "ia3tools merge " + shlex.join(parts)


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
