"""Chameleon's decoder layers over the torch backend's grouped KV cache, written for few kernels per step.

A captured decode step of the 7B model is bound by its kernel count as much as by its bytes: the step
the H200 runs measured (8.7 ms against a ~6 ms floor for the weights and the KV it reads, docs/gpu.md)
launched ~1740 kernels, ~50 per layer in transformers' Chameleon forward, most of them elementwise work
around the matmuls. This forward computes the same function from the same weights (the model's own
modules; only the small qk-norm gains are copied, joined) in 21 per layer:

- RMSNorm as one ``torch.rms_norm`` call (transformers: cast, pow, mean, add, rsqrt, mul, cast, mul);
- the query and key heads normalised together: one ``layer_norm`` and one ``addcmul`` with the
  per-head gains and biases of both (transformers: three kernels each);
- rotary embedding on queries and keys together in three kernels, with ``rotate_half`` as a flip
  of the two halves and its sign folded into the sine once per step (transformers: ten per layer);
- with ``fuse_projections`` (the torch backend applies it at load), q/k/v as one matmul and gate/up
  as another.

``kernels="triton"`` goes further (11 per layer: ``fused_kernels.py``). For the pre-norm order each
residual add is written together with the norm that follows it, the next sub-layer's or the final one, so
the Triton kernel can do both in one pass. ``tests/test_torch_layers.py`` checks this forward against
transformers' layers (float32, both layer orders), and ``benchmarks/step_ops.py`` counts the kernels. The
rounding differs from transformers' in the last bits (RMSNorm applies its gain before the cast back, not after).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingDependencyError

QK_NORM_EPS = 1e-5  # transformers' ChameleonLayerNorm uses this eps regardless of the config


class DecodeLayers(nn.Module):
    """``forward(ids (R, T), positions (R, T), cache) -> final-norm hidden states (R, T, hidden)``.

    ``cache`` is a ``kv_cache.GroupedKV`` (``update`` writes a layer's keys/values,
    ``attend`` reads them). The qk-norm gains of each layer are joined once, here, on the weights'
    device: build this after the weights are final and in place (the torch backend builds its decoder
    after loading).

    ``kernels="triton"`` does the elementwise work between the matmuls with ``fused_kernels.py``
    (11 kernels per layer instead of 21). It needs what those kernels assume: the pre-norm layer order,
    projections joined by ``fuse_projections``, a power-of-two head width, a CUDA device (or Triton's
    interpreter).
    """

    def __init__(self, lm, kernels: Literal["torch", "triton"] = "torch"):
        super().__init__()
        config = lm.config
        self.model = lm.model
        self.swin = bool(getattr(config, "swin_norm", False))
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        layers = self.model.layers
        # per layer, decided once here rather than looked up on every step: the joined qk-norm gains and
        # biases, (heads + kv_heads, head_dim), and whether fuse_projections joined its projections
        attns = [layer.self_attn for layer in layers]
        self.qk_norms = [tuple(torch.cat([getattr(a.q_norm, p), getattr(a.k_norm, p)]).detach() for p in ("weight", "bias"))
                         for a in attns]
        self.joined_qkv = [hasattr(a, "qkv_proj") for a in attns]
        self.joined_gate_up = [hasattr(layer.mlp, "gate_up_proj") for layer in layers]
        self.scaling = self.head_dim ** -0.5
        # the final norm's weight says where the layers run (the embedding may live elsewhere: decoder.py's text rows)
        half, norm = self.head_dim // 2, self.model.norm.weight
        self.rotate_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device=norm.device, dtype=norm.dtype)
        self.triton = None
        if kernels == "triton":
            self.triton = _triton_kernels(self, norm.device)
        elif kernels != "torch":
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")

    def _rms(self, x: torch.Tensor, norm) -> torch.Tensor:
        return torch.rms_norm(x, (x.shape[-1],), norm.weight, self.eps)

    def _add_rms(self, x: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream plus ``delta``, and it normalised by ``norm`` (the next sub-layer's input)."""
        if self.triton is not None:
            return self.triton.add_rms_norm(x, delta, norm.weight, self.eps)
        x = x if delta is None else x + delta
        return x, self._rms(x, norm)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return self.run(self.model.embed_tokens(ids), positions, cache)

    def run(self, x: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """``forward`` from the input embeddings x (R, T, hidden): for a caller that embeds the ids itself."""
        cos, sin = self.model.rotary_emb(x, positions)  # (R, T, head_dim), halves repeated
        sin = sin * self.rotate_sign
        layers = self.model.layers
        if self.swin:  # x + norm(sub-layer(x)): the norm is the sub-layer's, nothing to join with the add
            for i, layer in enumerate(layers):
                x = x + self._rms(self._attention(i, layer.self_attn, x, cos, sin, positions, cache),
                                  layer.input_layernorm)
                x = x + self._rms(self._mlp(i, layer.mlp, x), layer.post_attention_layernorm)
            return self._rms(x, self.model.norm)
        # pre-norm: x + sub-layer(norm(x)); each residual add is joined with the norm that follows it
        x, h = self._add_rms(x, None, layers[0].input_layernorm)
        for i, layer in enumerate(layers):
            x, h = self._add_rms(x, self._attention(i, layer.self_attn, h, cos, sin, positions, cache),
                                 layer.post_attention_layernorm)
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, h = self._add_rms(x, self._mlp(i, layer.mlp, h), following)
        return h

    def _attention(self, i: int, attn, h: torch.Tensor, cos, sin, positions, cache) -> torch.Tensor:
        qk_heads = self.heads + self.kv_heads
        if self.joined_qkv[i]:  # fuse_projections: one matmul
            qkv = attn.qkv_proj(h).unflatten(-1, (qk_heads + self.kv_heads, self.head_dim))
        else:
            qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1).unflatten(
                -1, (qk_heads + self.kv_heads, self.head_dim))
        gain, bias = self.qk_norms[i]
        if self.triton is not None:
            kv, scales = cache.layer_buffers(i)
            # the cache's slot for a token is its position (GroupedKV), so the positions say where to write
            query = self.triton.qk_norm_rope_store(qkv, gain, bias, cos, sin, positions, kv, self.heads,
                                                   self.kv_heads, QK_NORM_EPS, scales)
        else:
            # normalising the value heads too wastes a little arithmetic but spares a copy of the slice
            qk = torch.addcmul(bias, F.layer_norm(qkv, (self.head_dim,), eps=QK_NORM_EPS)[:, :, :qk_heads], gain)
            # rotate_half(x) * sin == (x's halves swapped) * (sin with its first half negated)
            swapped = qk.unflatten(-1, (2, self.head_dim // 2)).flip(-2).flatten(-2)
            qk = torch.addcmul(qk * cos.unsqueeze(2), swapped, sin.unsqueeze(2))
            query, key = qk[:, :, :self.heads].transpose(1, 2), qk[:, :, self.heads:].transpose(1, 2)
            cache.update(key, qkv[:, :, qk_heads:].transpose(1, 2), i)
        return attn.o_proj(cache.attend(i, query, self.scaling).flatten(2))

    def _mlp(self, i: int, mlp, h: torch.Tensor) -> torch.Tensor:
        if self.joined_gate_up[i]:
            gate_up = mlp.gate_up_proj(h)
            if self.triton is not None:
                return mlp.down_proj(self.triton.swiglu(gate_up))
            gate, up = gate_up.chunk(2, -1)
        else:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        return mlp.down_proj(mlp.act_fn(gate) * up)


def _triton_kernels(layers: DecodeLayers, device: torch.device):
    """``fused_kernels``, once the model is one its kernels fit (else a ValueError saying why)."""
    try:
        from . import fused_kernels
    except ImportError as exc:
        raise MissingDependencyError("kernels='triton' needs Triton (installed with torch's CUDA builds)") from exc
    problems = [
        (layers.swin, "the swin norm layer order (its norms follow the sub-layers)"),
        (not all(layers.joined_qkv) or not all(layers.joined_gate_up), "projections fuse_projections has not joined"),
        (layers.head_dim & (layers.head_dim - 1) != 0, f"head width {layers.head_dim}, not a power of two"),
        (not fused_kernels.available_on(device), f"device {device} (Triton compiles for CUDA)"),
    ]
    found = [why for bad, why in problems if bad]
    if found:
        raise ValueError("kernels='triton' cannot run this model: " + "; ".join(found))
    return fused_kernels


def fuse_projections(lm) -> int:
    """Join each layer's query, key and value projections into one linear (``qkv_proj``), and its gate and
    up projections into another (``gate_up_proj``), in place; returns how many were joined.

    Three matmuls become one, and the query and key heads come out side by side for the joint norm:
    fewer, wider kernels per step. Only plain ``nn.Linear`` weights without bias are joined (bitsandbytes'
    packed layers are left as they are); quantize after joining (the torch backend's int4 does). The
    model then serves ``DecodeLayers`` only: transformers' own forward needs the separate projections.
    """
    return sum(fuse_layer(layer) for layer in lm.model.layers)


def fuse_layer(layer) -> int:
    """``fuse_projections`` for one decoder layer (``placement.py`` joins each layer on the device, in turn)."""
    joined = 0
    for owner, parts, name in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                               (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")):
        linears = [getattr(owner, part) for part in parts]
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            continue
        weight = torch.cat([m.weight.detach() for m in linears])
        for part in parts:
            delattr(owner, part)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        setattr(owner, name, fused)
        joined += 1
    return joined
