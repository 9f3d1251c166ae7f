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


def wrap(model, output: str, kind: str):
    """The model as a module taking tensors positionally (named as the exported graph's inputs)
    and returning the one output that is exported and compared."""
    import torch

    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), output)

    class Seq2Seq(Text):
        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                      decoder_input_ids=decoder_input_ids), output)

    class Image(Text):
        def forward(self, pixel_values):
            return getattr(self.model(pixel_values=pixel_values), output)

    return {"text": Text, "seq2seq": Seq2Seq, "image": Image}[kind]().eval()


def example_inputs(model, kind: str, batch: int, length: int, decoder_length: int, pad: bool, seed: int):
    """Inputs for export (``pad`` False) and for parity (another shape, one row padded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        c = getattr(model.config, "num_channels", 3)
        size = getattr(model.config, "image_size", 64)
        size = size if isinstance(size, int) else 64
        return {"pixel_values": torch.randn(batch, c, size, size, generator=g)}, None
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if pad:
        mask[1, length - 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, decoder_length), generator=g)
        return inputs, None  # the compared output is over decoder positions, none of them padding
    return inputs, mask.numpy()


def dynamic_axes(kind: str):
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if kind == "image":
        return {"pixel_values": {0: batch}}, {"pixel_values": {0: "batch"}}
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    if kind == "seq2seq":
        shapes["decoder_input_ids"] = {0: batch, 1: torch.export.Dim("decoder_sequence")}
        axes["decoder_input_ids"] = {0: "batch", 1: "decoder_sequence"}
    axes["output"] = {0: "batch"}
    return shapes, axes


def export_graph(wrapper, inputs: dict, path: Path, opset: int, kind: str, log) -> str:
    """Export with dynamo; fall back to the TorchScript exporter. torch's own progress lines go to
    stderr, keeping stdout for the report."""
    import torch

    shapes, axes = dynamic_axes(kind)
    names = list(inputs)
    args = tuple(inputs.values())
    failures = []
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    for exporter in ("dynamo", "torchscript"):
        try:
            with contextlib.redirect_stdout(sys.stderr), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=names,
                                                output_names=["output"], dynamic_shapes=shapes, verbose=False)
                    program.save(str(path), external_data=True)
                else:
                    torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                                      output_names=["output"], dynamic_axes=axes)
            return exporter
        except Exception as exc:  # exporters raise many types; the next one gets its chance
            failures.append(f"{exporter}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
            log(f"{exporter} exporter failed; {'trying the next' if exporter == 'dynamo' else 'giving up'}")
            for leftover in path.parent.glob("model.onnx*"):
                leftover.unlink()
    raise ExportError("export failed: " + "; ".join(failures))


def validate_export(directory: Path) -> None:
    """Re-check a written export before it is published: the graph, and one data file beside it."""
    import onnx

    path = directory / "model.onnx"
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx checker rejects the export: {str(exc).strip().splitlines()[0]}", path=path) from None
    locations = data_locations(path)
    if locations - {DATA_FILE} or not (directory / DATA_FILE).is_file():
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
