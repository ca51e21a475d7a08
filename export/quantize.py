"""Weight-only quantization of the exported decoder graph with ONNX Runtime's MatMulNBits family.

Every MatMul with a constant weight becomes ``MatMulNBits`` (block-wise, symmetric, one
scale per ``block_size`` input channels), the ``lm_head`` included: at 7B it is a
73728 x 4096 matrix, 300M parameters, the largest single weight. The embedding table is
the same size, so its ``Gather`` becomes ``GatherBlockQuantized`` with the same bits.
Activations stay in float; only weights shrink.
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

    def __post_init__(self) -> None:
        if self.weights not in (None, *QUANT_BITS):
            raise ValueError(f"quantization must be one of None, 'int8', 'int4'; got {self.weights!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")

    def describe(self) -> dict:
        if self.weights is None:
            return {"weights": "float"}
        return {
            "weights": self.weights,
            "method": "onnxruntime MatMulNBits, block-wise symmetric, weight-only",
            "block_size": self.block_size,
            "lm_head": "quantized (MatMulNBits)",
            "embedding": "quantized (GatherBlockQuantized)" if self.quantize_embedding else "float",
        }


def quantize_decoder(src: Path, dst: Path, config: QuantizationConfig) -> None:
    """Write a weight-quantized copy of the float decoder graph ``src`` to ``dst`` (+ ``dst.data``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    ops = ("MatMul", "Gather") if config.quantize_embedding else ("MatMul",)
    algo = DefaultWeightOnlyQuantConfig(
        block_size=config.block_size, is_symmetric=True, bits=QUANT_BITS[config.weights],
        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=algo)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
