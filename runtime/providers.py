"""Choosing ONNX Runtime execution providers."""

from __future__ import annotations

from typing import Sequence

from pure_lite.errors import MissingDependencyError

PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError(
            "the runtime needs ONNX Runtime: pip install 'pure-lite[runtime]' (CPU) or 'pure-lite[gpu]' (CUDA)"
        ) from exc
    return ort


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """CUDA where ONNX Runtime has it, else CPU; ``requested`` overrides (and must be available)."""
    available = onnxruntime().get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            hint = ("; for CUDA install 'pure-lite[gpu]' (onnxruntime-gpu and CuPy) in place of [runtime]"
                    if "CUDAExecutionProvider" in missing else "")
            raise MissingDependencyError(f"execution providers {missing} are not available (have {available}){hint}")
        return list(requested)
    return [p for p in PREFERENCE if p in available]


def device_of(providers: Sequence[str]) -> str:
    """Where the KV cache lives for these providers: 'cuda' or 'cpu'."""
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
