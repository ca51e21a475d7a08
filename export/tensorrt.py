"""TensorRT engines from a float ONNX export, with prefill and decode optimization profiles.

UNVERIFIED: TensorRT cannot be installed on the machines this project is built and tested
on (neither the CPU machines nor the lent GPU machine), so ``build_tensorrt`` has never
run against a real TensorRT. What *is* tested: the import guard and its message, the
refusal of quantized (ONNX Runtime contrib-op) graphs, and that every op in the exported
float graphs is in ``TENSORRT_OPS``, the ONNX ops TensorRT's parser documents as supported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pure_lite.errors import ManifestError, MissingDependencyError
from pure_lite.manifest import Manifest

# ONNX (default domain) operators supported by TensorRT's ONNX parser (TensorRT 10 support matrix),
# restricted to the ones our float graphs may use. A new op in an export must be checked and added here.
TENSORRT_OPS = frozenset({
    "Add", "And", "ArgMax", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "Div",
    "Equal", "Erf", "Expand", "Gather", "Gemm", "GroupNormalization", "Greater", "GreaterOrEqual", "Identity",
    "InstanceNormalization", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Max", "Min", "Mul", "Neg",
    "Not", "Pad", "Pow", "Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
    "Reshape", "Resize", "ScatterND", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt",
    "Squeeze", "Sub", "Tile", "Transpose", "Unsqueeze", "Where",
})


def graph_ops(path: Path) -> set[tuple[str, str]]:
    """(domain, op_type) of every node in a graph, including nested functions."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    for fn in model.functions:
        ops |= {(n.domain or "ai.onnx", n.op_type) for n in fn.node}
    local = {(fn.domain, fn.name) for fn in model.functions}
    return ops - local


def unsupported_ops(path: Path) -> list[str]:
    """Ops in a graph that TensorRT's ONNX parser would not accept (contrib ops, unlisted ops)."""
    return sorted(f"{d}::{op}" if d != "ai.onnx" else op for d, op in graph_ops(path)
                  if d != "ai.onnx" or op not in TENSORRT_OPS)


@dataclass(frozen=True)
class EngineProfile:
    """Shape ranges of one optimization profile: (min, opt, max) for batch, new tokens and total length."""

    name: str
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    total: tuple[int, int, int]


def default_profiles(max_prompt: int, max_total: int) -> list[EngineProfile]:
    """Prefill: batch 1, the whole prompt. Decode: batch 1-2 (CFG), 1-3 new tokens (header, code + row end).

    ``total`` is the number of cache slots the runtime allocates (the restoration's whole length).
    """
    return [
        EngineProfile("prefill", batch=(1, 1, 1), seq=(1, max_prompt // 2, max_prompt), total=(1, max_total // 2, max_total)),
        EngineProfile("decode", batch=(1, 2, 2), seq=(1, 1, 3), total=(1, max_total // 2, max_total)),
    ]


def build_tensorrt(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = True,
    max_prompt: int | None = None,
    max_total: int | None = None,
    workspace_gib: float = 8.0,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Build ``decoder``, ``lm_head``, ``image_head``, ``vq_encoder`` and ``vq_decoder`` engines from a float export."""
    manifest = Manifest.load(onnx_dir)
    if manifest.quantization != "float":
        raise ManifestError(
            f"{onnx_dir} is quantized ({manifest.quantization}) with ONNX Runtime contrib ops that TensorRT cannot "
            "parse; export with --quant none and let TensorRT choose precisions"
        )
    for graph in manifest.graphs:
        bad = unsupported_ops(manifest.path(graph))
        if bad:
            raise ManifestError(f"{manifest.path(graph).name} uses ops TensorRT does not support: {', '.join(bad)}")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            "building engines needs NVIDIA TensorRT (pip install tensorrt on a machine with a CUDA GPU); "
            "it is not installed here. The ONNX export in this folder runs on ONNX Runtime without it."
        ) from exc

    say = progress or (lambda message: None)
    model = manifest.model
    max_total = max_total or model["max_position_embeddings"]
    max_prompt = max_prompt or max_total // 2
    heads, head_dim = model["num_key_value_heads"], model["head_dim"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    profiles = default_profiles(max_prompt, max_total)

    def build(graph: str, shape_profiles: list[dict[str, tuple]]) -> Path:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(manifest.path(graph))):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ManifestError(f"TensorRT could not parse {graph}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        for shapes in shape_profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        say(f"building {graph}.engine ({len(shape_profiles)} profile(s)); this takes minutes")
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ManifestError(f"TensorRT failed to build {graph}")
        path = out / f"{graph}.engine"
        path.write_bytes(bytes(engine))
        return path

    decoder_shapes = []
    for p in profiles:
        shapes: dict[str, list] = {}
        for i in range(3):  # min, opt, max
            b, t, slots = p.batch[i], p.seq[i], p.total[i]
            shapes.setdefault("input_ids", []).append((b, t))
            shapes.setdefault("position_ids", []).append((b, t))
            shapes.setdefault("attention_mask", []).append((b, slots + t))
            for layer in range(model["num_hidden_layers"]):
                for kind in ("key", "value"):
                    shapes.setdefault(f"past_key_values.{layer}.{kind}", []).append((b, heads, slots, head_dim))
        decoder_shapes.append({k: tuple(v) for k, v in shapes.items()})
    side = 2 * max(int(k) for k in manifest.data["tokens"]["grid_ids"]) * 32 if manifest.data["tokens"]["grid_ids"] else 512
    build("decoder", decoder_shapes)
    hidden = model["hidden_size"]
    for head in ("lm_head", "image_head"):
        build(head, [{"hidden": ((1, hidden), (2, hidden), (2, hidden))}])
    build("vq_encoder", [{"pixels": ((1, 3, 32, 32), (1, 3, 512, 512), (1, 3, side, side))}])
    build("vq_decoder", [{"codes": ((1, 4, 4), (1, 64, 64), (1, side // 8, side // 8))}])
    info = {"source": str(Path(onnx_dir).resolve()), "fp16": fp16,
            "profiles": [p.__dict__ for p in profiles], "verified": False}
    (out / "pure_lite_tensorrt.json").write_text(json.dumps(info, indent=2))
    return out
