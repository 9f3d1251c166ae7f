"""The torch model as an ONNX graph: a wrapper that takes the graph's inputs positionally, example
inputs, dynamic axes, the exporters (dynamo, then TorchScript), and the tidy, validated layout that
is published: ``model.onnx`` and one external data file, ``model.onnx.data``, beside it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from ia3tools.errors import ExportError

DATA_FILE = "model.onnx.data"


class Signature:
    """What the graph takes and returns: input names in order, output names, the
    sentence-transformers pooling that adds ``sentence_embedding`` (None for none), and each
    input's dynamic axes (by default batch and sequence, as its name implies). ``slots`` are
    runtime adapter vectors, graph inputs after ``inputs`` with static shapes."""

    def __init__(self, inputs: list[str], outputs: list[str], pooling: tuple[str, ...] | None = None,
                 normalize: bool = False, axes: dict[str, dict[int, str]] | None = None):
        self.inputs, self.outputs, self.pooling, self.normalize = inputs, outputs, pooling, normalize
        self.axes = axes or {name: _default_axes(name) for name in inputs}
        self.slots: list[str] = []

    @property
    def graph_inputs(self) -> list[str]:
        return self.inputs + self.slots


def _default_axes(name: str) -> dict[int, str]:
    if name == "pixel_values":
        return {0: "batch"}
    if name == "decoder_input_ids":
        return {0: "batch", 1: "decoder_sequence"}
    return {0: "batch", 1: "sequence"}


def wrap(model, signature: Signature, holder: dict | None = None):
    """The model as a module taking the graph's inputs positionally and returning its outputs; the
    slots' vectors go into ``holder``, for the hooks that multiply them in."""
    import torch

    from ia3tools.exporting.pooling import pool

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            feed = dict(zip(signature.graph_inputs, inputs))
            for name in signature.slots:
                holder[name] = feed.pop(name)
            result = self.model(**feed)
            first = getattr(result, signature.outputs[0])
            if signature.pooling is None:
                return first
            return first, pool(first, feed["attention_mask"], signature.pooling, signature.normalize)

    return Graph().eval()


def example_inputs(model, signature: Signature, batch: int, length: int, pad: bool, seed: int):
    """Inputs for the export (``pad`` False) and for parity (another shape: one row right-padded,
    sentence pairs in ``token_type_ids``), with the mask of real positions (None where outputs
    are not per input position)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if signature.inputs == ["pixel_values"]:
        c = getattr(model.config, "num_channels", 3)
        size = getattr(model.config, "image_size", 64)
        size = size if isinstance(size, int) else 64
        return {"pixel_values": torch.randn(batch, c, size, size, generator=g)}, None
    vocab = model.config.vocab_size
    mask = torch.ones(batch, length, dtype=torch.int64)
    if pad:
        mask[1, length - 2:] = 0
    segments = torch.zeros(batch, length, dtype=torch.int64)
    segments[:, length // 2:] = 1  # a second sentence in the second half
    segments *= mask
    feed = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g), "attention_mask": mask,
            "token_type_ids": segments,
            "decoder_input_ids": torch.randint(0, vocab, (batch, max(2, length - 1)), generator=g)}
    inputs = {name: feed[name] for name in signature.inputs}
    per_position = "decoder_input_ids" not in inputs  # seq2seq outputs are over decoder positions, none padded
    return inputs, (mask.numpy() if per_position else None)


def _dims(signature: Signature):
    """Dynamic dims: (torch.export shapes, one Dim per axis name; TorchScript axis names)."""
    import torch

    dims: dict[str, object] = {}
    shapes = tuple({axis: dims.setdefault(dim, torch.export.Dim(dim))
                    for axis, dim in signature.axes.get(name, {}).items()} for name in signature.graph_inputs)
    axes = dict(signature.axes)
    for name in signature.outputs:
        axes.setdefault(name, {0: "batch"})
    return (shapes,), axes


def export_graph(wrapper, signature: Signature, inputs: dict, path: Path, opset: int, log):
    """Export with dynamo, returning ("dynamo", the program) for ``write_model`` to write; or, where
    dynamo fails, with the TorchScript exporter straight to ``path``, returning ("torchscript",
    None). torch's own progress lines go to stderr, keeping stdout for the report."""
    import torch

    shapes, axes = _dims(signature)
    args, names = tuple(inputs[n] for n in signature.graph_inputs), signature.graph_inputs
    failures = []
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    for exporter in ("dynamo", "torchscript"):
        try:
            with contextlib.redirect_stdout(sys.stderr), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                                input_names=names, output_names=signature.outputs,
                                                dynamic_shapes=shapes, verbose=False)
                    return exporter, program
                torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset,
                                  input_names=names, output_names=signature.outputs, dynamic_axes=axes)
                tidy(path)
                return exporter, None
        except Exception as exc:  # exporters raise many types; the next one gets its chance
            failures.append(f"{exporter}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
            log(f"{exporter} exporter failed; {'trying the next' if exporter == 'dynamo' else 'giving up'}")
            for leftover in path.parent.glob("model.onnx*"):
                leftover.unlink()
    raise ExportError("export failed: " + "; ".join(failures))


def release_exporter_state() -> None:
    """Drop what the exporter keeps after it returns. onnxscript's pattern matchers (module-level
    rewrite rules) remember the last graph they matched, and through it every weight of the model
    just exported; dynamo's caches hold the traced module. Without this, the whole float32 model
    stays in memory through the parity check."""
    import gc

    import onnx_ir as ir
    import torch

    torch._dynamo.reset()
    held = (ir.Graph, ir.Node, ir.Function, ir.Model)
    for obj in gc.get_objects():
        module = getattr(type(obj), "__module__", None)
        if isinstance(module, str) and module.startswith("onnxscript.rewriter") and hasattr(obj, "__dict__"):
            if callable(getattr(obj, "_init_match", None)):
                obj._init_match(0)  # a fresh match state, in place of the last match (and its nodes)
            for name, value in list(vars(obj).items()):
                if isinstance(value, held):
                    setattr(obj, name, None)
    gc.collect()


INLINE_BYTES = 1024  # tensors up to this size stay in model.onnx: onnxruntime's shape inference reads them there
ALIGN_BYTES = 1 << 16  # larger tensors start at 64 KiB offsets, so onnxruntime can memory-map them anywhere
_CHUNK = 16 << 20


def write_model(model, path: Path) -> None:
    """Write an ``onnx_ir`` model as ``path`` plus one external data file beside it, without
    holding a second copy of the weights: each initializer is written straight from the tensor the
    exporter holds (the model's own parameters), a transposed view (what the exporter's constant
    folding leaves) in 16 MB row blocks; offsets are aligned for memory mapping and the data's
    writeback starts at once. The exporter's per-node debug metadata (stack traces, FX dumps: about
    40% of model.onnx, with local paths in it) is left out, so the export is reproducible."""
    import numpy as np
    import onnx_ir as ir
    import torch

    for graph in list(model.graphs()) + list(model.functions.values()):
        for node in graph:
            node.metadata_props.clear()
    data = path.parent / DATA_FILE
    staging = torch.empty(_CHUNK, dtype=torch.uint8)
    fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    offset = 0
    try:
        for graph in model.graphs():
            for name, value in graph.initializers.items():
                tensor = value.const_value
                if tensor is None:
                    continue
                if tensor.nbytes <= INLINE_BYTES:
                    if not isinstance(tensor, ir.Tensor):  # external (a loaded model's) or lazy: inline it
                        value.const_value = ir.tensor(tensor.numpy(), name=name)
                    continue
                if tensor.nbytes > (1 << 20):
                    offset = -(-offset // ALIGN_BYTES) * ALIGN_BYTES
                raw = getattr(tensor, "raw", None)
                if isinstance(raw, torch.Tensor):
                    array = raw.detach()
                elif isinstance(raw, np.ndarray) and all(st >= 0 for st in raw.strides):
                    array = raw  # a view the exporter's constant folding made: written in blocks
                else:
                    array = np.ascontiguousarray(tensor.numpy())
                written = _write_array(fd, array, offset, staging)
                if written != tensor.nbytes:
                    raise ExportError(f"initializer {name} wrote {written} bytes, expected {tensor.nbytes}")
                value.const_value = ir.ExternalTensor(DATA_FILE, offset, written, tensor.dtype, shape=tensor.shape,
                                                      name=name, base_dir=path.parent)
                offset += written
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start writeback now, not at the fsync
    finally:
        os.close(fd)
    ir.save(model, path)
    os.chmod(data, path.stat().st_mode & 0o777)


def _write_array(fd: int, array, offset: int, staging) -> int:
    """Write a tensor's bytes in C order at ``offset``: a contiguous one straight from its memory,
    another in row blocks gathered into the reusable ``staging`` buffer (no allocation per block)."""
    import numpy as np
    import torch

    if isinstance(array, np.ndarray) and array.flags.c_contiguous:  # a loaded model's tensors: as they are
        return _pwrite_view(fd, memoryview(array.reshape(-1).view(np.uint8)), offset)
    with warnings.catch_warnings():  # a read-only (memory-mapped) array is only read here
        warnings.simplefilter("ignore")
        t = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if t.dim() == 0:
        t = t.reshape(1)
    row = t[0].numel() * t.element_size()
    rows = max(1, len(staging) // max(1, row))
    written = 0
    for lo in range(0, t.shape[0], rows):
        block = t[lo: lo + rows]
        if not block.is_contiguous() and block.numel() * t.element_size() <= len(staging):
            gathered = staging[: block.numel() * t.element_size()].view(t.dtype).view(block.shape)
            gathered.copy_(block)
            block = gathered
        written += _pwrite_view(fd, memoryview(block.contiguous().view(torch.uint8).numpy()).cast("B"),
                                offset + written)
    return written


def _pwrite_view(fd: int, view, offset: int) -> int:
    from ia3tools.formats.files import pwrite

    total = len(view)
    while view:
        n = pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return total


def validate_export(directory: Path) -> None:
    """Re-check a written export before it is published: the graph, and one data file beside it."""
    import onnx

    path = directory / "model.onnx"
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx checker rejects the export: {str(exc).strip().splitlines()[0]}", path=path) from None
    locations = data_locations(path)
    if locations - {DATA_FILE} or (locations and not (directory / DATA_FILE).is_file()):
        raise ExportError(f"external data is not the single file {DATA_FILE}: {sorted(locations)}", path=path)


def data_locations(path: Path) -> set[str]:
    """The external data files the model at ``path`` names (read without loading the weights)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    return {ExternalDataInfo(t).location for t in header.graph.initializer if uses_external_data(t)}


def tidy(path: Path) -> None:
    """Re-save the export as it is published: all weights in one external data file with a plain
    name beside model.onnx (one file per weight litters the directory; a path would make the export
    unportable or unsafe), and no per-node debug metadata. The exporter records stack traces and
    FX dumps there (about 40% of model.onnx for small models), which can carry local paths and make
    the same model differ from machine to machine."""
    import onnx

    locations = data_locations(path)
    model = onnx.load(str(path))  # brings in the weights from wherever the exporter put them
    for node in all_nodes(model):
        del node.metadata_props[:]
    for name in locations:
        (path.parent / name).unlink(missing_ok=True)
    # Tiny tensors (shape constants, axes) stay inline: onnxruntime's shape inference needs them there.
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE)
    os.chmod(path.parent / DATA_FILE, path.stat().st_mode & 0o777)  # onnx creates it 0600


def all_nodes(model):
    """Every node of the model: the main graph, its subgraphs (If/Loop bodies) and local functions."""
    import onnx

    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    return nodes
