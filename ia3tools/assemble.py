"""The merged model described tensor by tensor, before anything is written: for each output tensor,
its name, dtype, shape and where its bytes come from (a raw byte range of a base shard, a fold, a
dtype conversion, or an adapter head). ``merge`` writes this description; ``verify`` recomputes it
and compares it with a merged directory, so the two can never drift apart."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable


from ia3tools.errors import FoldError
from ia3tools.fold import NonFinite, block_scale, row_blocks, row_bytes
from ia3tools.formats.adapter import Adapter
from ia3tools.formats.checkpoint import Checkpoint, TensorRef
from ia3tools.formats.dtypes import DTYPES, byte_size
from ia3tools.plan import FoldPlan
from ia3tools.write import OutTensor


@dataclass
class Assembly:
    """Output tensors grouped by the base shard they come from (added heads go with the last)."""

    shards: dict[str, list[OutTensor]]
    folded: list[str]  # output names of folded weights and biases
    replaced: list[str]  # output names of base tensors replaced by heads
    added: list[str]  # output names of heads the base lacked

    def all_tensors(self) -> list[OutTensor]:
        return [t for tensors in self.shards.values() for t in tensors]


def _blocks(shape: tuple[int, ...], dtype: str):
    """(first row, rows, bytes per row, block shape) of each row block of a tensor."""
    itemsize = DTYPES[dtype].bits // 8
    one_row = row_bytes(shape, itemsize)
    for lo, n in row_blocks(shape, itemsize):
        yield lo, n, one_row, (n,) + shape[1:] if shape else shape


def _read_ahead(read: Callable[[int, int], bytes], blocks: list):
    """Yield (block, bytes) while a worker thread already reads the next block, so disk reads
    overlap the fold (and, on a GPU, the transfers) and the caller's writes."""
    if len(blocks) == 1:
        lo, n, row_bytes, _ = blocks[0]
        yield blocks[0], read(lo * row_bytes, n * row_bytes)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, blocks[0][0] * blocks[0][2], blocks[0][1] * blocks[0][2])
        for i, block in enumerate(blocks):
            raw = pending.result()
            if i + 1 < len(blocks):
                lo, n, row_bytes, _ = blocks[i + 1]
                pending = pool.submit(read, lo * row_bytes, n * row_bytes)
            yield block, raw


def _producer(read: Callable[[int, int], bytes], shape, dtype, out_dtype, scale, folder, where: str):
    """Block-by-block bytes of ``read``'s tensor, converted to ``out_dtype`` and scaled by ``scale``."""

    def chunks():
        for (lo, n, _, block_shape), raw in _read_ahead(read, list(_blocks(shape, dtype))):
            s = block_scale(scale, lo, n) if scale is not None else None
            try:
                yield folder.fold(raw, dtype, block_shape, s, out_dtype)
            except NonFinite as exc:
                raise FoldError(
                    f"folding gives {exc.args[0]} non-finite value(s) after the cast to {out_dtype} "
                    f"(overflow: the vector pushes the weight past the dtype's range)",
                    tensor=where,
                ) from None

    return chunks


def assemble(ckpt: Checkpoint, adapter: Adapter, plan: FoldPlan, folder,
             dtype_for: Callable[[TensorRef], str]) -> Assembly:
    """Describe the merged model. ``dtype_for`` gives each base tensor's output dtype (its own
    unless ``--dtype`` converts floating tensors)."""
    touched = plan.by_base_tensor()
    heads = {h.replaces: h for h in plan.heads if h.replaces}
    shards: dict[str, list[OutTensor]] = {}
    folded, replaced, added = [], [], []
    for shard, refs in ckpt.shard_tensors().items():
        out = shards.setdefault(shard, [])
        for ref in refs:
            name = plan.output_name(ref.name)
            out_dtype = dtype_for(ref)
            read = functools.partial(ckpt.read_bytes, ref.name)
            raw = ckpt.byte_range(ref.name) if out_dtype == ref.dtype else None
            if ref.name in heads:
                head = heads[ref.name]
                info = adapter.heads[head.name]
                out.append(_head_tensor(adapter, info, name, out_dtype, folder))
                replaced.append(name)
            elif ref.name in touched:
                fold, part = touched[ref.name]
                vector = adapter.vectors[fold.module]
                scale = fold.scale(vector, ref.shape) if part == "weight" else vector.reshape(-1)
                chunks = _producer(read, ref.shape, ref.dtype, out_dtype, scale, folder, ref.name)
                out.append(OutTensor(name, out_dtype, ref.shape, byte_size(out_dtype, ref.shape), chunks=chunks))
                folded.append(name)
            elif raw is not None:
                out.append(OutTensor(name, ref.dtype, ref.shape, ref.nbytes, raw=raw))
            else:
                chunks = _producer(read, ref.shape, ref.dtype, out_dtype, None, folder, ref.name)
                out.append(OutTensor(name, out_dtype, ref.shape, byte_size(out_dtype, ref.shape), chunks=chunks))
    last = list(shards)[-1]
    head_dtype = _model_dtype(ckpt, dtype_for)
    for head in plan.heads:
        if head.replaces is None:
            name = plan.head_output(head)
            shards[last].append(_head_tensor(adapter, adapter.heads[head.name], name, head_dtype, folder))
            added.append(name)
    return Assembly(shards, folded, replaced, added)


def _head_tensor(adapter: Adapter, info, name: str, out_dtype: str, folder) -> OutTensor:
    """A ``modules_to_save`` tensor, cast to the dtype the model holds it in (PEFT loads the saved
    head into the model's own parameter, which casts it)."""
    if not DTYPES[info.dtype].foldable:
        out_dtype = info.dtype
    read = functools.partial(adapter.head_bytes, info.name)
    chunks = _producer(read, info.shape, info.dtype, out_dtype, None, folder, info.key)
    return OutTensor(name, out_dtype, info.shape, byte_size(out_dtype, info.shape),
                     chunks=chunks)


def _model_dtype(ckpt: Checkpoint, dtype_for) -> str:
    """The floating dtype holding most of the model's bytes (what a new head is created in)."""
    totals: dict[str, int] = {}
    for ref in ckpt.tensors.values():
        if DTYPES[ref.dtype].foldable:
            d = dtype_for(ref)
            totals[d] = totals.get(d, 0) + ref.nbytes
    return max(totals, key=totals.get) if totals else "F32"
