"""Build time: PURE checkpoint -> ONNX graphs (float, int8, int4) and TensorRT engines. Needs torch."""

from .onnx_export import export_onnx
from .quantize import QuantizationConfig
from .tensorrt import build_tensorrt

__all__ = ["export_onnx", "build_tensorrt", "QuantizationConfig"]
