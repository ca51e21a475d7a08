"""Weight-only quantization of the exported decoder graph with ONNX Runtime's MatMulNBits family.

Every MatMul with a constant weight becomes ``MatMulNBits`` (block-wise, symmetric, one
scale per ``block_size`` input channels), the ``lm_head`` included: at 7B it is a
73728 x 4096 matrix, 300M parameters, the largest single weight. The embedding table is
the same size: for int4 its ``Gather`` becomes ``GatherBlockQuantized`` (4-bit, the only
width ONNX Runtime's quantizer supports there); for int8 it is stored in float16 and cast
after the lookup (half the bytes, exact to fp16).

``accuracy_level=4`` lets ONNX Runtime's CPU kernels quantize activations to int8 per
block inside MatMulNBits: measured on 2 cores it is what makes the quantized graphs fast
(int8 decode step 42 ms -> 0.8 ms, int4 3.7 ms -> 0.8 ms, against 1.7 ms in float, on a
small model), for a small extra error. CUDA kernels ignore it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantizationConfig:
    """How the decoder's weights are stored. ``weights=None`` keeps float."""

    weights: Literal["int8", "int4"] | None = None
    block_size: int = 128
    quantize_embedding: bool = True
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.weights not in (None, *QUANT_BITS):
            raise ValueError(f"quantization must be one of None, 'int8', 'int4'; got {self.weights!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    @property
    def embedding(self) -> str:
        if not self.quantize_embedding:
            return "float32"
        return "int4 (GatherBlockQuantized)" if self.weights == "int4" else "float16"

    def describe(self) -> dict:
        if self.weights is None:
            return {"weights": "float"}
        return {
            "weights": self.weights,
            "method": "onnxruntime MatMulNBits, block-wise symmetric, weight-only",
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
            "lm_head": f"{self.weights} (MatMulNBits)",
            "embedding": self.embedding,
        }


def _ort_config(config: QuantizationConfig):
    """ONNX Runtime's quantizer settings for ``config``: used by ``quantize_graph`` and ``quantize_streamed`` alike."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    int4_gather = config.quantize_embedding and config.weights == "int4"
    return DefaultWeightOnlyQuantConfig(
        block_size=config.block_size, is_symmetric=True, bits=QUANT_BITS[config.weights],
        accuracy_level=config.accuracy_level,
        op_types_to_quantize=("MatMul", "Gather") if int4_gather else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )


def quantize_graph(src: Path, dst: Path, config: QuantizationConfig) -> None:
    """Write a weight-quantized copy of a float language-model graph (decoder or head) to ``dst`` (+ ``.data``).

    The in-memory path (``export_onnx(streaming=False)``): the whole float graph is loaded.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    int4_gather = config.quantize_embedding and config.weights == "int4"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=_ort_config(config))
    quantizer.process()
    model = quantizer.model.model
    if config.quantize_embedding and not int4_gather:
        _embedding_to_float16(model)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data")


def _embedding_to_float16(model) -> None:
    """Store float32 tables looked up by Gather (the embedding) in float16, with a Cast back after the lookup."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 \
                or consumers[node.input[0]] != 1 or table.dims[0] * table.dims[1] < 1 << 16:
            new_nodes.append(node)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), table.name)
        table.CopyFrom(half)
        gathered = node.output[0] + "_fp16"
        cast = helper.make_node("Cast", [gathered], [node.output[0]], to=onnx.TensorProto.FLOAT,
                                name=node.name + "_to_float")
        node.output[0] = gathered
        new_nodes += [node, cast]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def quantize_streamed(model, fills: list, config: QuantizationConfig) -> None:
    """``quantize_graph`` for a graph whose weights are not loaded yet (``weight_stream``).

    The same nodes change the same way as ONNX Runtime's quantizer changes them: every MatMul with a
    2-D constant weight becomes MatMulNBits; for int4 the Gather of a constant table becomes
    GatherBlockQuantized; for int8 a large Gather table is stored in float16 with a Cast after it.
    Each weight's ``Fill`` gets the quantizer's own block functions as its encoder, so a streamed
    export stores the same bytes as one quantized in memory.
    """
    if config.weights is None:
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    algo = _ort_config(config)
    quantizer = DefaultWeightOnlyQuantizer(algo)
    graph = model.graph
    fill_of = {id(fill.values[0]): fill for fill in fills}
    gather_blocks = "Gather" in algo.op_types_to_quantize
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul":
            _matmul_nbits(graph, node, fill_of, quantizer, algo)
        elif node.op_type == "Gather" and gather_blocks:
            _gather_block_quantized(graph, node, fill_of, quantizer, algo)
        elif node.op_type == "Gather" and config.quantize_embedding:
            _gather_float16(graph, node, fill_of)
    model.opset_imports["com.microsoft"] = 1
    if gather_blocks:  # what ONNX Runtime's quantizer does for 4-bit tensors in standard ops
        model.opset_imports[""] = max(model.opset_imports.get("", 0), 21)
        model.ir_version = max(model.ir_version or 0, 10)


def _quiet(fn, *args) -> list:
    """Call an ONNX Runtime block quantizer; its NumPy code divides all-zero blocks by 0 (and then uses 0)."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        return list(fn(*args))


def _weight_fill(node, index: int, fill_of: dict):
    """The streamed weight a node reads at ``index``, or None where that input is no initializer."""
    from .weight_stream import ExportError

    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or not value.is_initializer():
        return None
    fill = fill_of.get(id(value))
    if fill is None:
        raise ExportError(f"{node.op_type} {node.name!r} reads constant {value.name!r}, which is no checkpoint "
                          "weight; the quantizer would quantize it and this exporter does not")
    if len(value.uses()) != 1:
        raise ExportError(f"weight {value.name!r} has {len(value.uses())} uses; quantizing it needs exactly one")
    return fill


def _replace(graph, node, new_nodes: list, new_weights: list, old_weight) -> None:
    import onnx_ir as ir

    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, node.outputs, new_nodes[-1].outputs)
    del graph.initializers[old_weight.name]
    for value in new_weights:
        graph.initializers[value.name] = value


def _matmul_nbits(graph, node, fill_of: dict, quantizer, algo) -> None:
    import onnx_ir as ir

    fill = _weight_fill(node, 1, fill_of)
    if fill is None or len(fill.values[0].shape) < 2:
        return
    weight = fill.values[0]
    if len(weight.shape) != 2:
        from .weight_stream import ExportError

        raise ExportError(f"MatMul weight {weight.name!r} has shape {tuple(weight.shape)}; only 2-D weights are streamed")
    k, n = weight.shape
    bits, block = algo.bits, algo.block_size
    k_blocks = -(-k // block)
    packed = ir.Value(name=f"{weight.name}_Q{bits}", type=ir.TensorType(ir.DataType.UINT8),
                      shape=ir.Shape([n, k_blocks, -(-block * bits // 8)]))
    scales = ir.Value(name=f"{weight.name}_scales", type=ir.TensorType(weight.dtype), shape=ir.Shape([n, k_blocks]))
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
    if algo.accuracy_level:
        attributes["accuracy_level"] = algo.accuracy_level
    new = ir.node("MatMulNBits", [node.inputs[0], packed, scales], attributes, domain="com.microsoft",
                  name=f"{node.name}_Q{bits}" if node.name else "")
    _replace(graph, node, [new], [packed, scales], weight)
    fill.values = [packed, scales]
    fill.encode = lambda w: list(quantizer.qbits_block_quant(w)[:2])
    fill.chunk_axis = 1  # B is (K, N) and every column of it is quantized on its own


def _gather_block_quantized(graph, node, fill_of: dict, quantizer, algo) -> None:
    import onnx_ir as ir

    fill = _weight_fill(node, 0, fill_of)
    if fill is None:
        return
    table = fill.values[0]
    rank = len(table.shape)
    axis = algo.quant_axes.get("Gather", 1) % rank
    block = algo.block_size
    data = ir.Value(name=f"{table.name}_Q4", type=ir.TensorType(ir.DataType.INT4), shape=ir.Shape(list(table.shape)))
    scale_shape = [-(-d // block) if i == axis else d for i, d in enumerate(table.shape)]
    scales = ir.Value(name=f"{table.name}_scales", type=ir.TensorType(table.dtype), shape=ir.Shape(scale_shape))
    gather_axis = node.attributes.get("axis")
    attributes = {"gather_axis": gather_axis.as_int() if gather_axis is not None else 0,
                  "quantize_axis": axis, "block_size": block}
    new = ir.node("GatherBlockQuantized", [data, node.inputs[1], scales], attributes, domain="com.microsoft",
                  name=f"{node.name}_Q4" if node.name else "")
    _replace(graph, node, [new], [data, scales], table)
    fill.values = [data, scales]
    fill.encode = lambda t: _quiet(quantizer.quantize_ndarray, t, axis, block, True)[:2]
    fill.chunk_axis = 0 if axis != 0 else None  # blocks run along a row: rows are independent


def _gather_float16(graph, node, fill_of: dict) -> None:
    """``_embedding_to_float16`` on a streamed graph: the same tables, the same Cast."""
    import numpy as np
    import onnx_ir as ir

    table = node.inputs[0]
    if table is None or not table.is_initializer() or table.dtype != ir.DataType.FLOAT or len(table.shape) != 2 \
            or len(table.uses()) != 1 or table.shape[0] * table.shape[1] < 1 << 16:
        return
    fill = _weight_fill(node, 0, fill_of)
    table.type = ir.TensorType(ir.DataType.FLOAT16)
    gather = ir.node("Gather", list(node.inputs), dict(node.attributes), name=node.name,
                     outputs=[ir.Value(name=node.outputs[0].name + "_fp16")])
    cast = ir.node("Cast", gather.outputs, {"to": ir.DataType.FLOAT}, name=node.name + "_to_float")
    ir.convenience.replace_nodes_and_values(graph, node, [node], [gather, cast], node.outputs, cast.outputs)
    fill.encode = lambda t: [t.astype(np.float16)]
