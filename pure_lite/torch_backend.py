"""The torch backend: a checkpoint folder -> Components (layout, tokenizer, VQ codec, decoders)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .checkpoint import CheckpointFiles, load_vq_state_dict
from .components import Components
from .errors import CheckpointError, MissingDependencyError
from .lm import ImageHead, load_language_model
from .torch_decoder import TorchDecoder
from .prompt import TextTokenizer
from .tokens import TokenLayout
from .vq import VQConfig, VQModel

Quantization = Literal["nf4", "int8"]


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


def _bnb_config(quantization: Quantization, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it installed; fail here with a clear message)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise MissingDependencyError(
            "quantization needs bitsandbytes and accelerate: pip install 'pure-lite[quant]'"
        ) from exc
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be 'nf4', 'int8' or None, got {quantization!r}")


def load_components(path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    quantization: Quantization | None = None) -> Components:
    files = CheckpointFiles.locate(path)
    config = files.read_config()
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, vocab_size=config["vocab_size"])
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    qconfig = _bnb_config(quantization, dtype) if quantization else None
    lm = load_language_model(files, device=device, dtype=dtype, quantization_config=qconfig)
    vq = load_vq(files, device)
    if vq.config.codebook_size != layout.codebook_size:
        raise CheckpointError(
            f"the VQ codebook has {vq.config.codebook_size} codes but the tokenizer has {layout.codebook_size} image tokens"
        )
    image_head = ImageHead(lm, layout.image_ids)  # built once: the image rows of lm_head, in code order
    # One decoder for every batch: its cache buffers and CUDA graphs carry over to the next batch of the
    # same shape (the next tiles, the next photo of that size) instead of being captured again.
    decoder = TorchDecoder(lm, image_head, device)
    return Components(
        layout=layout,
        tokenizer=TextTokenizer(files.tokenizer),
        codec=TorchCodec(vq, device),
        new_decoder=lambda: decoder,
        max_positions=config["max_position_embeddings"],
        description=f"torch ({device}, {str(dtype).removeprefix('torch.')}{', ' + quantization if quantization else ''})",
    )
