"""``verify``: prove a merged directory is exactly base ⊙ adapter. The expected model is recomputed
with the same assembly ``merge`` writes (streamed, row block by row block) and compared bitwise
with the merged tensors; every other tensor must equal the base's."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ia3tools.assemble import assemble
from ia3tools.fold import NumpyFolder
from ia3tools.commands.check import base_vocab_size
from ia3tools.formats import open_checkpoint, read_adapter
from ia3tools.formats.hub import base_of, locate
from ia3tools.formats.dtypes import DTYPES
from ia3tools.plan import build_plan
from ia3tools.reports import Report
from ia3tools.errors import FormatError
from ia3tools.formats.safetensors import ByteRange
from ia3tools.write import OutTensor, read_input

_COMPARE_BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Difference:
    """A tensor that is not what the merge must give: ``differs`` (with the largest absolute
    error; None when a side is not finite or cannot be decoded), ``shape or dtype`` (expected and
    found as [dtype, shape]), ``missing`` or ``extra``."""

    tensor: str
    problem: str
    max_abs_error: float | None = None
    expected: list | None = None
    found: list | None = None


@dataclass
class VerifyReport(Report):
    """``ok`` only when every tensor matches bit for bit and none is missing or extra."""

    command: ClassVar[str] = "verify"
    base: str
    adapter: str
    merged: str
    tensors: int
    folded: int
    differences: list[Difference]
    base_id: str | None = None  # the base's hub id, when known

    @property
    def ok(self) -> bool:
        return not self.differences


def verify(base: str | os.PathLike | None, adapter: str | os.PathLike, merged: str | os.PathLike) -> VerifyReport:
    """Compare ``merged`` with the merge of ``adapter`` into ``base`` (a directory, a hub id in
    the local cache, or None for the one the adapter names), streaming."""
    with contextlib.ExitStack() as inputs:
        ad = inputs.enter_context(contextlib.closing(read_adapter(adapter)))
        located = locate(base) if base is not None else base_of(ad.config)
        ckpt = inputs.enter_context(contextlib.closing(open_checkpoint(located.path)))
        out = inputs.enter_context(contextlib.closing(open_checkpoint(merged)))
        plan = build_plan(ckpt, ad, base_vocab_size(ckpt))
        plan.require_fit(adapter)
        merged_refs = out.tensors

        def dtype_for(ref):  # a merge made with --dtype converted floating tensors: expect that
            got = merged_refs.get(plan.output_name(ref.name))
            if got is not None and DTYPES[ref.dtype].foldable and DTYPES[got.dtype].foldable:
                return got.dtype
            return ref.dtype

        expected = assemble(ckpt, ad, plan, NumpyFolder(), dtype_for).all_tensors()
        differences = []
        for t in expected:
            got = merged_refs.get(t.name)
            if got is None:
                differences.append(Difference(t.name, "missing"))
            elif (got.dtype, got.shape) != (t.dtype, t.shape):
                differences.append(Difference(t.name, "shape or dtype", expected=[t.dtype, list(t.shape)],
                                              found=[got.dtype, list(got.shape)]))
            else:
                differs, err = _compare(t, out.reader(t.name), t.name)
                if differs:
                    differences.append(Difference(t.name, "differs", err))
        names = {t.name for t in expected}
        differences += [Difference(n, "extra") for n in merged_refs if n not in names]
        return VerifyReport(str(located.path), str(adapter), str(merged), len(expected), len(plan.by_base_tensor()),
                            differences, base_id=located.hub_id, warnings=plan.warnings)


def _expected_blocks(t: OutTensor):
    if t.raw is not None:
        return _raw_blocks(t.raw)
    return t.chunks()


def _raw_blocks(raw: ByteRange):
    done = 0
    while done < raw.nbytes:
        chunk = read_input(raw, done, min(_COMPARE_BLOCK, raw.nbytes - done))
        if not chunk:
            raise FormatError("file shrank while being read (it ends inside the tensor data)", path=raw.path)
        yield chunk
        done += len(chunk)


def _compare(t: OutTensor, reader, name: str) -> tuple[bool, float | None]:
    """(differs, the largest absolute difference: None when a side is not finite or the dtype
    cannot be decoded)."""
    position, worst, differ = 0, 0.0, False
    for block in _expected_blocks(t):
        found = reader.read_bytes(name, position, len(block))
        if found != block:
            differ = True
            np_dtype = DTYPES[t.dtype].numpy
            if np_dtype is None or not (DTYPES[t.dtype].foldable or np_dtype.kind in "iub"):
                worst = float("nan")
            else:
                a = np.frombuffer(block, np_dtype).astype(np.float64)
                b = np.frombuffer(found, np_dtype).astype(np.float64)
                with np.errstate(invalid="ignore"):
                    diff = np.abs(a - b)
                worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf"))
        position += len(block)
    return differ, (worst if math.isfinite(worst) else None)

