"""A torch checkpoint folder of the shipped PURE-tiny, rebuilt from its int8 ONNX export.

    python benchmarks/pure_tiny_checkpoint.py build/pure-tiny-torch

The repository ships PURE-tiny only as an export (pure_lite/models/pure_tiny); the torch backend's own
benchmarks (``kv_quant.py``) need a checkpoint folder. Every tensor is in the export under its torch name
(``step.model.…`` in decoder.onnx, ``lm_head.weight`` in lm_head.onnx, ``vq.…`` in the VQ graphs); the
language model's matrices are MatMulNBits int8 (symmetric, zero point 128, one float32 scale per 128 input
channels, ``export/quantize.py``), dequantized here to float32: ``(q - 128) * scale``, the padding of the last
block dropped. The embedding is stored in float16. So the rebuilt model is the shipped one, computed in float32:
not the float weights PURE-tiny was trained to (those were rounded to int8 at export), which is what a KV cache's
fidelity is measured on as well as any.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SHIPPED = ROOT / "pure_lite" / "models" / "pure_tiny"


def _initializers(graph: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))  # loads the external .data too
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dequantize_nbits(q: np.ndarray, scales: np.ndarray, in_features: int) -> np.ndarray:
    """MatMulNBits 8-bit (N, blocks, block) uint8 and (N, blocks) scales -> the (N, K) weight of a torch Linear."""
    weight = (q.astype(np.float32) - 128.0) * scales.astype(np.float32)[:, :, None]
    return weight.reshape(q.shape[0], -1)[:, :in_features]


def rebuild(out: Path, shipped: Path = SHIPPED) -> Path:
    import torch
    from safetensors.torch import save_file

    from pure_lite.checkpoint import IMAGE_SIZE_KEY
    from pure_lite.testing import make_tiny_checkpoint
    from pure_lite.torch_backend.vq import VQConfig, VQModel
    from pure_lite.train.pack_train import LMShape

    manifest = json.loads((shipped / "pure_lite_manifest.json").read_text())
    m = manifest["model"]
    shape = LMShape()
    if (shape.hidden_size, shape.num_layers, shape.num_heads, shape.max_position_embeddings) != (
            m["hidden_size"], m["num_hidden_layers"], m["num_attention_heads"], m["max_position_embeddings"]):
        raise SystemExit(f"the export's shape {m} is not pack_train's LMShape {shape}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # config.json in the layout pack_train writes (compact vocabulary, PURE-tiny's shape); weights replaced below
    make_tiny_checkpoint(tmp, layout="compact", compact_codebook=manifest["tokens"]["codebook_size"], init_std=0.02,
                         **asdict(shape))
    shutil.copyfile(shipped / "tokenizer.json", tmp / "tokenizer.json")
    config = json.loads((tmp / "config.json").read_text())
    if config["vocab_size"] != m["vocab_size"]:
        raise SystemExit(f"vocabulary {config['vocab_size']} != the export's {m['vocab_size']}")
    config[IMAGE_SIZE_KEY] = m["image_size"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))

    from transformers import ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(tmp, torch_dtype=torch.float32)
    wanted = model.state_dict()
    graph = _initializers(shipped / "decoder.onnx") | _initializers(shipped / "lm_head.onnx")
    state = {}
    for name, value in graph.items():
        key = name.removeprefix("step.")
        if key.endswith("_scales") or key.endswith("inv_freq") or key not in wanted and not key.endswith("_Q8"):
            continue
        if key.endswith(".weight_Q8"):
            key = key.removesuffix("_Q8")
            value = _dequantize_nbits(value, graph[name.removesuffix("_Q8") + "_scales"], wanted[key].shape[1])
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).reshape(wanted[key].shape)
    missing = sorted(k for k in wanted if k not in state and k.startswith(("model.layers", "model.embed", "model.norm",
                                                                           "lm_head")))
    if missing:
        raise SystemExit(f"the export lacks {missing[:5]} ({len(missing)} in all)")
    inv_freq = graph["step.model.rotary_emb.inv_freq"]
    if not np.allclose(inv_freq, model.model.rotary_emb.inv_freq.numpy()):
        raise SystemExit("the export's rotary frequencies differ from the config's")
    model.load_state_dict(state, strict=False)
    for f in tmp.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(tmp, max_shard_size="100MB")
    (tmp / "generation_config.json").unlink(missing_ok=True)
    (tmp / "tiny_checkpoint.json").unlink(missing_ok=True)

    vq_graph = _initializers(shipped / "vq_encoder.onnx") | _initializers(shipped / "vq_decoder.onnx")
    vq_state = {k.removeprefix("vq."): v for k, v in vq_graph.items() if k.startswith("vq.")}
    vq = VQModel(VQConfig.from_state_dict({k: torch.from_numpy(v) for k, v in vq_state.items()}))
    # every weight from the graphs; only the training-time usage counter (unused by inference) stays zeros
    target = {k: v for k, v in vq.state_dict().items() if k != "quantize.codebook_used"}
    vq.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(vq_state[k])).reshape(v.shape)
                        for k, v in target.items()}, strict=False)
    (tmp / "vq_ds8_c2i.pt").unlink()
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, tmp / "vq_ds8_c2i.safetensors")
    (tmp / "rebuilt_from.json").write_text(json.dumps({
        "export": str(shipped.relative_to(ROOT)), "decoder.onnx.data sha256": manifest["files"]["decoder.onnx.data"]["sha256"],
        "note": "MatMulNBits int8 weights dequantized to float32; embedding from float16"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    print(rebuild(ap.parse_args().out))


if __name__ == "__main__":
    main()
