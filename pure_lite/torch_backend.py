"""The torch backend: a checkpoint folder -> Components (layout, tokenizer, VQ codec, decoders)."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from .checkpoint import CheckpointFiles, load_vq_state_dict, trained_image_size, trained_scale
from .components import Components
from .decode_layers import fuse_projections
from .errors import CheckpointError, MissingDependencyError
from .lm import ImageHead, load_language_model
from .torch_decoder import TorchDecoder
from .prompt import TextTokenizer
from .tokens import TokenLayout
from .vq import VQConfig, VQModel

Quantization = Literal["nf4", "int8", "int4"]
INT4_GROUP = 128  # torchao's tinygemm int4 layout: one scale and zero per 128 input columns


def load_vq(files: CheckpointFiles, device: str = "cpu") -> VQModel:
    state = load_vq_state_dict(files.vq)
    vq = VQModel(VQConfig.from_state_dict(state))
    try:
        vq.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{files.vq}: tensors do not match the VQ-8 architecture: {exc}") from exc
    return vq.to(device).eval()


class TorchCodec:
    """VQ encode/decode behind NumPy arrays (pixels 1x3xHxW in [-1, 1], codes h x w)."""

    def __init__(self, vq: VQModel, device: str):
        self.vq, self.device = vq, device

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.vq.encode(torch.from_numpy(pixels).to(self.device))[0].cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.vq.decode(torch.from_numpy(codes).to(self.device)[None]).float().cpu().numpy()


def _bnb_config(quantization: Literal["nf4", "int8"], compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it installed; fail here with a clear message)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise MissingDependencyError(
            "quantization needs bitsandbytes and accelerate: pip install 'pure-lite[quant]'"
        ) from exc
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _check_int4(device: str, dtype: torch.dtype | None):
    """torchao's int4 weight-only path: CUDA only, bf16 activations; fails before any weight is read."""
    if not str(device).startswith("cuda"):
        raise ValueError(f"quantization='int4' runs torchao's tinygemm kernel, which needs a CUDA device, not {device!r}")
    if dtype not in (None, torch.bfloat16):
        raise ValueError(f"quantization='int4' computes in bfloat16 (tinygemm's activations), not {dtype}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "quantization='int4' needs torchao, built for your torch: pip install 'pure-lite[torchao]'"
        ) from exc


def _int4_fits(module: torch.nn.Module, _name: str = "") -> bool:
    """The linears tinygemm can pack: input width a multiple of the group, output width a multiple of 8."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % INT4_GROUP == 0
            and module.out_features % 8 == 0)


def quantize_int4(lm) -> int:
    """Quantize the decoder layers' linears to int4 in place (torchao, group 128); returns how many.

    Only ``lm.model.layers``: the embeddings and ``lm_head`` stay bf16, since the image head slices
    ``lm_head``'s rows and its logits feed the entropy top-k sampler directly. Measured on an H200 with
    a 7B-shaped model (docs/gpu.md), captured steps of this layout are the fastest 4-bit decode we have,
    ahead of bitsandbytes' nf4.
    """
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    fits = [m for m in lm.model.layers.modules() if _int4_fits(m)]
    if not fits:
        raise CheckpointError(f"no decoder linear has an input width divisible by {INT4_GROUP}: nothing to quantize to int4")
    quantize_(lm.model.layers, Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d"),
              filter_fn=_int4_fits)
    return len(fits)


def load_components(path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    quantization: Quantization | None = None, kv_cache: Literal["int8"] | None = None) -> Components:
    files = CheckpointFiles.locate(path)
    config = files.read_config()
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, vocab_size=config["vocab_size"])
    if kv_cache not in (None, "int8"):
        raise ValueError(f"kv_cache must be 'int8' or None (the model's dtype), got {kv_cache!r}")
    if quantization is not None and quantization not in get_args(Quantization):
        raise ValueError(f"quantization must be 'nf4', 'int8', 'int4' or None, got {quantization!r}")
    if quantization == "int4":
        _check_int4(device, dtype)
        dtype = torch.bfloat16
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    qconfig = _bnb_config(quantization, dtype) if quantization in ("nf4", "int8") else None
    lm = load_language_model(files, device=device, dtype=dtype, quantization_config=qconfig)
    fuse_projections(lm)  # one matmul for q/k/v and one for gate/up (bitsandbytes' layers stay as they are)
    if quantization == "int4":
        quantize_int4(lm)  # after joining, before the decoder is built: its CUDA graphs capture the int4 kernels
    vq = load_vq(files, device)
    if vq.config.codebook_size != layout.codebook_size:
        raise CheckpointError(
            f"the VQ codebook has {vq.config.codebook_size} codes but the tokenizer has {layout.codebook_size} image tokens"
        )
    image_head = ImageHead(lm, layout.image_ids)  # built once: the image rows of lm_head, in code order
    # One decoder for every batch: its cache buffers and CUDA graphs carry over to the next batch of the
    # same shape (the next tiles, the next photo of that size) instead of being captured again.
    decoder = TorchDecoder(lm, image_head, device, kv_int8=kv_cache == "int8")
    details = [str(device), str(dtype).removeprefix("torch."), quantization, kv_cache and f"{kv_cache} KV cache"]
    details = [d for d in details if d]
    return Components(
        layout=layout,
        tokenizer=TextTokenizer(files.tokenizer),
        codec=TorchCodec(vq, device),
        new_decoder=lambda: decoder,
        max_positions=config["max_position_embeddings"],
        description=f"torch ({', '.join(details)})",
        image_size=trained_image_size(config),
        trained_scale=trained_scale(config),
    )
