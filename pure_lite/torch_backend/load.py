"""The torch backend's entry point: a checkpoint folder -> Components (layout, tokenizer, VQ codec, decoder)."""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch

from ..checkpoint import CheckpointFiles, load_vq_state_dict, trained_image_size, trained_scale
from ..components import Components
from ..errors import CheckpointError
from ..prompt import TextTokenizer
from ..tokens import TokenLayout
from .chameleon import ImageHead, load_language_model
from .decoder import TorchDecoder
from .kv_cache import KVKind
from .layers import fuse_projections
from .placement import place
from .quantize import Quantization, bnb_config, check_int4
from .vq import VQConfig, VQModel


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


def load_components(path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    quantization: Quantization | None = None, kv_cache: KVKind | None = None,
                    text_device: str | None = None, codec_device: str | None = None) -> Components:
    """``text_device``: keep only the embedding rows an image block feeds on ``device``, the whole embedding and
    ``lm_head`` there (``vocab_rows.py``; what the memory plan's "vocabulary off the device" loads).
    ``codec_device``: where the VQ codec encodes and decodes tiles (default ``device``; the memory plan's
    "VQ codec on the CPU" when its weights and a tile's feature maps do not fit beside the KV cache)."""
    files = CheckpointFiles.locate(path)
    config = files.read_config()
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, vocab_size=config["vocab_size"])
    if kv_cache not in (None, *get_args(KVKind)):
        raise ValueError(f"kv_cache must be 'int8', 'int4' or None (the model's dtype), got {kv_cache!r}")
    if quantization is not None and quantization not in get_args(Quantization):
        raise ValueError(f"quantization must be 'nf4', 'int8', 'int4' or None, got {quantization!r}")
    if quantization == "int4":
        check_int4(device, dtype)
        dtype = torch.bfloat16
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    qconfig = bnb_config(quantization, dtype) if quantization in ("nf4", "int8") else None
    if qconfig is not None:  # bitsandbytes quantizes while transformers loads, onto the device
        lm = load_language_model(files, device=device, dtype=dtype, quantization_config=qconfig)
        fuse_projections(lm)  # joins nothing it packed: fuse_projections leaves bitsandbytes' layers as they are
    else:  # read on the host, then moved a layer at a time, each joined (one matmul for q/k/v, one for
        # gate/up) and quantized on the way: the device never holds the whole model in bf16
        lm = load_language_model(files, device="cpu", dtype=dtype)
        place(lm, device, int4=quantization == "int4", tables_on_device=text_device is None)
    codec_device = codec_device or device
    vq = load_vq(files, codec_device)
    if vq.config.codebook_size != layout.codebook_size:
        raise CheckpointError(
            f"the VQ codebook has {vq.config.codebook_size} codes but the tokenizer has {layout.codebook_size} image tokens"
        )
    image_head = ImageHead(lm, layout.image_ids).to(device)  # built once: lm_head's image rows, in code order
    # One decoder for every batch: its cache buffers and CUDA graphs carry over to the next batch of the
    # same shape (the next tiles, the next photo of that size) instead of being captured again.
    decoder = TorchDecoder(lm, image_head, device, kv_cache=kv_cache, text_device=text_device,
                           image_phase_ids=layout.image_phase_ids)
    details = [str(device), str(dtype).removeprefix("torch."), quantization, kv_cache and f"{kv_cache} KV cache",
               text_device and f"text rows on {text_device}", codec_device != device and f"VQ codec on {codec_device}"]
    details = [d for d in details if d]
    return Components(
        layout=layout,
        tokenizer=TextTokenizer(files.tokenizer),
        codec=TorchCodec(vq, codec_device),
        new_decoder=lambda: decoder,
        max_positions=config["max_position_embeddings"],
        description=f"torch ({', '.join(details)})",
        image_size=trained_image_size(config),
        trained_scale=trained_scale(config),
        shares_decoder=True,
    )
