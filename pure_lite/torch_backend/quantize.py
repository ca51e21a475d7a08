"""Weight quantization at load time: bitsandbytes nf4/int8 (through transformers) and torchao int4.

Kept apart from loading because each path checks its own prerequisites (device, dtype, the package)
before any weight is read, and the memory plan needs the same facts (which linears int4 can pack).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import CheckpointError, MissingDependencyError

Quantization = Literal["nf4", "int8", "int4"]
INT4_GROUP = 128  # torchao's tinygemm int4 layout: one scale and zero per 128 input columns


def bnb_config(quantization: Literal["nf4", "int8"], compute_dtype: torch.dtype):
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


def check_int4(device: str, dtype: torch.dtype | None):
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


def int4_linears(lm) -> int:
    """How many decoder linears int4 will pack; refuses a model with none, before anything is moved or read."""
    fits = sum(1 for m in lm.model.layers.modules() if _int4_fits(m))
    if not fits:
        raise CheckpointError(f"no decoder linear has an input width divisible by {INT4_GROUP}: nothing to quantize to int4")
    return fits


def quantize_int4(lm) -> int:
    """Quantize the decoder layers' linears to int4 in place (torchao, group 128); returns how many.

    Only ``lm.model.layers``: the embeddings and ``lm_head`` stay bf16, since the image head slices
    ``lm_head``'s rows and its logits feed the entropy top-k sampler directly. Measured on an H200 with
    a 7B-shaped model (docs/gpu.md), captured steps of this layout are the fastest 4-bit decode we have,
    ahead of bitsandbytes' nf4. Loading goes layer by layer instead (``placement.py``, ``quantize_layer_int4``).
    """
    fits = int4_linears(lm)
    for layer in lm.model.layers:
        quantize_layer_int4(layer)
    return fits


def quantize_layer_int4(layer: torch.nn.Module) -> None:
    """One decoder layer's linears to torchao's int4 (tinygemm's tile-packed layout, group 128), in place."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantize_(layer, Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d"),
              filter_fn=_int4_fits)
