"""``check``: does an adapter fit a base checkpoint? The answer is the fold plan's findings."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ClassVar

from ia3tools.formats import open_checkpoint, read_adapter
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

    @property
    def ok(self) -> bool:
        return not self.errors


def check(base: str | os.PathLike, adapter: str | os.PathLike) -> CheckReport:
    """Plan ``adapter`` onto ``base`` from headers and vectors only. A misfit is a report with
    ``ok`` false listing every problem; unreadable inputs raise ``Ia3Error``."""
    with contextlib.ExitStack() as inputs:
        ckpt = inputs.enter_context(contextlib.closing(open_checkpoint(base)))
        ad = inputs.enter_context(contextlib.closing(read_adapter(adapter)))
        plan = build_plan(ckpt, ad)
        summary = summarise(plan)
        return CheckReport(os.fspath(base), os.fspath(adapter), len(ad.vectors), summary.names, summary.folds,
                           summary.heads, plan.errors, warnings=plan.warnings)
