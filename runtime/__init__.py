"""Deploy time: serve an exported folder with NumPy + ONNX Runtime (CUDA where present). Never imports torch."""

from .engine import KVBuffers, OnnxDecoder, load_components
from .providers import select_providers

__all__ = ["load_components", "OnnxDecoder", "KVBuffers", "select_providers"]
