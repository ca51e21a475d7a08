"""A language model read on the host moved to the device one decoder layer at a time, joined and quantized there.

Why not ``model.to(device)`` and then quantize: the 7B in bf16 is ~14 GB, so an 8 or 12 GB card runs out of
memory while loading, before the memory plan's 7.5 GB configuration ever runs. Here the device holds, at any
moment, the layers already finished (in their final format), one layer in the model's dtype (0.40 GB for the
7B) and, while that layer's projections are joined, their joined copy. The embedding and ``lm_head`` go to the
device only when they are to stay there (not with the vocabulary on the host, ``vocab_rows.py``: 1.2 GB that
the old order moved to the device and back, and the allocator kept). transformers' Chameleon VQ-VAE
(``model.vqmodel``, 0.06 GB for the 7B) stays on the host: PURE encodes and decodes with its own VQ-8, and a
released checkpoint does not even hold that model's weights.
"""

from __future__ import annotations

import torch

from .layers import fuse_layer
from .quantize import int4_linears, quantize_layer_int4

HOST_ONLY = ("vqmodel",)  # children of lm.model the decode never runs


def place(lm, device, *, int4: bool = False, tables_on_device: bool = True, on_layer=None) -> None:
    """Move ``lm`` (read on the host) to ``device`` layer by layer; join each layer's projections, and with
    ``int4`` quantize it, before the next one moves. ``on_layer(index)`` is called after each layer is done
    (tests watch the device's contents there). ``tables_on_device=False`` leaves the embedding and
    ``lm_head`` where they are (the decoder's ``text_device`` then keeps them)."""
    device = torch.device(device)
    if int4:
        int4_linears(lm)  # refuse a model int4 cannot pack before anything moves
    for index, layer in enumerate(lm.model.layers):
        layer.to(device)
        fuse_layer(layer)
        if int4:
            quantize_layer_int4(layer)
        if on_layer is not None:
            on_layer(index)
    skip = {"layers", *HOST_ONLY} | (set() if tables_on_device else {"embed_tokens"})
    for name, child in lm.model.named_children():
        if name not in skip:
            child.to(device)
    if tables_on_device:
        lm.lm_head.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the layers' replaced bf16 blocks: give them back before the cache is sized
