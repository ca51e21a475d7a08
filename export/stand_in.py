"""Weightless stand-ins of a checkpoint's models: the real architecture, with fake parameters.

A fake tensor (torch's ``FakeTensorMode``) has a shape and a dtype and no storage, so the decoder of
a 7B model traces in the memory of a tiny one; the graph keeps one empty initializer per parameter,
named after it, for ``weight_stream`` to fill from the checkpoint. What no checkpoint holds is made
real (the rotary frequencies, computed from the config), and the stand-in is checked against the
checkpoint as strictly as loading it would be: every weight present, every shape equal.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.errors import CheckpointError

from .tensors import Tensors
from .weight_stream import ExportError, Source


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # real inputs (example tensors, index lists) may meet fake weights
    return FakeTensorMode(allow_non_fake_inputs=True)


def _state(module) -> dict:
    """Parameters and persistent buffers by every name they have (tied weights appear under each)."""
    persistent = set(module.state_dict(keep_vars=True))
    named = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    return {name: tensor for name, tensor in named if name in persistent}


def _require_real_buffers(module) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    persistent = set(module.state_dict(keep_vars=True))
    fake = [name for name, b in module.named_buffers() if isinstance(b, FakeTensor) and name not in persistent]
    if fake:
        raise ExportError(f"stand-in buffers no checkpoint holds are still fake: {fake}")


def checkpoint_keys(module, tensors: Tensors, *, optional: tuple[str, ...] = ()) -> dict[int, str]:
    """The checkpoint tensor behind each parameter and persistent buffer of ``module``, by the tensor's identity.

    A weight tied to another (``lm_head`` to the embedding) is one tensor under two names; it is read
    under whichever name the checkpoint holds. Raises CheckpointError for weights the checkpoint lacks
    (names starting with ``optional`` excepted) or holds with another shape.
    """
    names: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, tensor in _state(module).items():
        names.setdefault(id(tensor), []).append(name)
        shapes[id(tensor)] = tuple(tensor.shape)
    held = set(tensors.names())
    keys, missing, wrong = {}, [], []
    for ident, aliases in names.items():
        found = [n for n in aliases if n in held]
        if not found:
            missing += [n for n in aliases if not n.startswith(optional)][:1]
            continue
        keys[ident] = found[0]
        if tensors.shape(found[0]) != shapes[ident]:
            wrong.append(f"{found[0]} {tensors.shape(found[0])} (model: {shapes[ident]})")
    if missing or wrong:
        raise CheckpointError(f"weights missing or of the wrong shape: {(missing + wrong)[:8]}")
    return keys


def sources(module, keys: dict[int, str], derived: dict[int, Source] | None = None) -> dict[str, Source]:
    """Initializer name -> Source for a module about to be traced (its names are the graph's initializer names)."""
    derived = derived or {}
    named = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    out = {}
    for name, tensor in named:
        if id(tensor) in derived:
            out[name] = derived[id(tensor)]
        elif id(tensor) in keys:
            out[name] = Source(keys[id(tensor)])
    return out


def language_model(files: CheckpointFiles):
    """Chameleon with the checkpoint's config and fake weights, set up for the split-cache graph."""
    import torch
    from transformers import ChameleonForConditionalGeneration

    from pure_lite.torch_backend.chameleon import SPLIT_ATTENTION, chameleon_config, register_split_attention

    config = chameleon_config(files)
    register_split_attention()
    with _fake_mode():
        lm = ChameleonForConditionalGeneration._from_config(config, attn_implementation=SPLIT_ATTENTION,
                                                            dtype=torch.float32)
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm.config)  # real: no checkpoint holds it
    _require_real_buffers(lm)
    return lm.eval()


def image_head(lm, image_ids: np.ndarray, keys: dict[int, str]):
    """``ImageHead`` of the stand-in, and where its weight comes from: rows ``image_ids`` of ``lm_head``, in code order."""
    from pure_lite.torch_backend.chameleon import ImageHead

    head = ImageHead(lm, image_ids).eval()
    rows = np.array(image_ids, dtype=np.int64)
    return head, {id(head.weight): Source(keys[id(lm.lm_head.weight)], rows=rows)}


def vq_model(tensors: Tensors):
    """The VQ-8 tokenizer at the checkpoint's widths (read off its tensor shapes) with fake weights."""
    import torch

    from pure_lite.torch_backend.vq import VQConfig, VQModel

    shapes = {name: torch.empty(tensors.shape(name), device="meta") for name in tensors.names()}
    config = VQConfig.from_state_dict(shapes)
    with _fake_mode():
        vq = VQModel(config)
    extra = sorted(set(tensors.names()) - set(_state(vq)))
    if extra:
        raise CheckpointError(f"tensors do not match the VQ-8 architecture: unexpected {extra[:8]}")
    _require_real_buffers(vq)
    return vq.eval()
