"""Smaller exports: fp16 weights, int8 weights. Both keep the computation in float32.

- ``--dtype fp16`` stores every float32 weight in float16 and inserts a ``Cast`` to float32 in front
  of its users. The graph then computes exactly as the float32 one on weights rounded once to fp16,
  and runs on every execution provider: onnxruntime's CPU provider has no fp16 kernels for much of
  a transformer (a graph computing in fp16 would not run there, or would fall back op by op).
- ``--quantize int8`` is onnxruntime's dynamic quantization (``quantize_dynamic``): weights int8
  per output channel, activations quantized at run time, for ``MatMul`` and the embeddings'
  ``Gather``. ``Gemm`` nodes (GPT-2's Conv1D exports as Gemm) are rewritten first as ``MatMul`` plus
  ``Add``, since the dynamic quantizer does not handle Gemm: every weight matrix is quantized.
"""

from __future__ import annotations

from pathlib import Path

from ia3tools.exporting.graph import INLINE_BYTES


def float32_bytes(model) -> int:
    """Bytes of the float32 initializers the exporter wrote (what the conversions shrink)."""
    import onnx_ir as ir

    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT)


def gemm_to_matmul(model) -> int:
    """Rewrite each ``Gemm(A, B[, C])`` whose B is a weight (alpha = beta = 1, A not transposed) as
    ``MatMul(A, B)`` (+ ``Add(C)``), transposing a ``transB`` weight lazily, one tensor at a time as
    it is written. Returns how many were rewritten."""
    import onnx_ir as ir

    rewritten = 0
    for graph in model.graphs():
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            weight = node.inputs[1]
            if (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)
                    or weight is None or weight.const_value is None or weight.name not in graph.initializers):
                continue
            if attrs.get("transB", 0):
                weight = _transposed(graph, weight)
            matmul = ir.node("MatMul", inputs=[node.inputs[0], weight])
            nodes = [matmul]
            result = matmul.outputs[0]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                add = ir.node("Add", inputs=[result, node.inputs[2]])
                nodes.append(add)
                result = add.outputs[0]
            graph.insert_before(node, nodes)
            old = node.outputs[0]
            result.name, result.shape, result.type = old.name, old.shape, old.type
            old.replace_all_uses_with(result, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            rewritten += 1
    return rewritten


def _transposed(graph, value):
    import onnx_ir as ir

    source = value.const_value
    shape = ir.Shape(list(reversed(source.shape.numpy())))
    lazy = ir.LazyTensor(lambda: ir.tensor(source.numpy().T.copy()), dtype=source.dtype, shape=shape)
    transposed = ir.Value(name=f"{value.name}.T", shape=shape, type=ir.TensorType(source.dtype), const_value=lazy)
    graph.register_initializer(transposed)
    return transposed


def to_fp16(model) -> int:
    """Store every float32 weight over ``INLINE_BYTES`` in float16, behind a Cast to float32 (the
    rounding happens lazily, as each tensor is written). Returns how many were converted."""
    import numpy as np
    import onnx_ir as ir

    converted = 0
    for graph in model.graphs():
        first = next(iter(graph), None)
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.nbytes <= INLINE_BYTES:
                continue
            half = ir.LazyTensor(lambda t=tensor: ir.tensor(t.numpy().astype(np.float16)),
                                 dtype=ir.DataType.FLOAT16, shape=tensor.shape)
            stored = ir.Value(name=f"{name}.fp16", shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT16),
                              const_value=half)
            graph.initializers.pop(name)
            graph.register_initializer(stored)
            cast = ir.node("Cast", inputs=[stored], attributes={"to": ir.DataType.FLOAT})
            if first is None:
                graph.append(cast)
            else:
                graph.insert_before(first, cast)
            widened = cast.outputs[0]
            value.replace_all_uses_with(widened, replace_graph_outputs=True)
            widened.name, widened.shape, widened.type = name, value.shape, ir.TensorType(ir.DataType.FLOAT)
            converted += 1
    return converted


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantization of the model at ``source`` into ``target``."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger, would reach stderr
    try:
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(logging.NOTSET)
