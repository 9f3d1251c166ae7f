"""``check``: does an adapter fit a base checkpoint? The answer is the fold plan's findings."""

from __future__ import annotations

import os

from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.plan import FoldPlan, build_plan


def check(base: str | os.PathLike, adapter: str | os.PathLike) -> tuple[FoldPlan, dict]:
    """Plan ``adapter`` onto ``base`` (headers and vectors only) and summarise the result."""
    ckpt = open_checkpoint(base)
    try:
        ad = read_adapter(adapter)
        try:
            plan = build_plan(ckpt, ad)
        finally:
            ad.close()
    finally:
        ckpt.close()
    return plan, plan_report(plan, base=base, adapter=adapter, vectors=len(ad.vectors))


def plan_report(plan: FoldPlan, *, base, adapter, vectors: int) -> dict:
    """The plan as data: what ``check --json`` and ``merge --dry-run --json`` print."""
    return {
        "fits": plan.ok,
        "base": os.fspath(base),
        "adapter": os.fspath(adapter),
        "names": plan.names.describe(),
        "vectors": vectors,
        "folds": [
            {
                "module": f.module,
                "weight": f.weight,
                "bias": f.bias,
                "output": plan.output_name(f.weight),
                "layer": f.layer,
                "feedforward": f.feedforward,
                "scales": ("columns" if f.axis == 1 else "rows") if f.layer in ("linear", "conv1d") else
                          ("input channels" if f.axis == 1 else "output channels"),
                "groups": f.groups,
                "length": f.length,
            }
            for f in plan.folds
        ],
        "heads": [
            {"name": h.name, "replaces": h.replaces, "output": plan.head_output(h), "shape": list(h.shape)}
            for h in plan.heads
        ],
        "errors": [f.as_dict() for f in plan.errors],
        "warnings": [f.as_dict() for f in plan.warnings],
    }
