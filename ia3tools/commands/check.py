"""``check``: does an adapter fit a base checkpoint? The answer is the fold plan's findings."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ClassVar

from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.formats.config import read_model_config
from ia3tools.formats.hub import base_of, locate
from ia3tools.plan import Finding, FoldPlan, build_plan
from ia3tools.reports import Report


@dataclass(frozen=True)
class FoldRow:
    """One vector's fold: which base weight (and bias) it scales, and how."""

    module: str  # in the adapter's namespace
    weight: str  # base tensor
    bias: str | None
    output: str  # the weight's name in the merged model
    layer: str  # linear, conv1d, conv2d, conv3d
    feedforward: bool
    scales: str  # rows, columns, output channels, input channels
    groups: int
    length: int


@dataclass(frozen=True)
class HeadRow:
    """A ``modules_to_save`` tensor: the base tensor it replaces, or None when it is added."""

    name: str
    replaces: str | None
    output: str
    shape: list[int]


@dataclass
class PlanSummary:
    names: str  # how the adapter's names relate to the base's
    folds: list[FoldRow]
    heads: list[HeadRow]


def summarise(plan: FoldPlan) -> PlanSummary:
    """The plan as data: what ``check`` and ``merge --dry-run`` report."""
    folds = [FoldRow(f.module, f.weight, f.bias, plan.output_name(f.weight), f.layer, f.feedforward, f.scales,
                     f.groups, f.length) for f in plan.folds]
    heads = [HeadRow(h.name, h.replaces, plan.head_output(h), list(h.shape)) for h in plan.heads]
    return PlanSummary(plan.names.describe(), folds, heads)


@dataclass
class CheckReport(Report):
    """Whether the adapter fits; ``ok`` is false when any ``errors`` were found."""

    command: ClassVar[str] = "check"
    base: str
    adapter: str
    vectors: int
    names: str
    folds: list[FoldRow]
    heads: list[HeadRow]
    errors: list[Finding]
    base_id: str | None = None  # the base's hub id, when known

    @property
    def ok(self) -> bool:
        return not self.errors


def check(base: str | os.PathLike | None, adapter: str | os.PathLike) -> CheckReport:
    """Plan ``adapter`` onto ``base`` (a directory, a hub id in the local cache, or None for the
    one the adapter names) from headers and vectors only. A misfit is a report with ``ok`` false
    listing every problem; unreadable inputs raise ``Ia3Error``."""
    with contextlib.ExitStack() as inputs:
        ad = inputs.enter_context(contextlib.closing(read_adapter(adapter)))
        located = locate(base) if base is not None else base_of(ad.config)
        ckpt = inputs.enter_context(contextlib.closing(open_checkpoint(located.path)))
        plan = build_plan(ckpt, ad, base_vocab_size(ckpt))
        summary = summarise(plan)
        return CheckReport(str(located.path), os.fspath(adapter), len(ad.vectors), summary.names, summary.folds,
                           summary.heads, plan.errors, base_id=located.hub_id, warnings=plan.warnings)


def base_vocab_size(ckpt) -> int | None:
    """The vocabulary size the base's config.json states (a resized embedding is checked against it)."""
    directory = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    size = (read_model_config(directory) or {}).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None
