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

``tests/test_decode_layers.py`` checks it against transformers' layers (float32, both layer
orders), and ``benchmarks/step_ops.py`` counts the kernels. The rounding differs from
transformers' in the last bits (RMSNorm applies its gain before the cast back, not after).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QK_NORM_EPS = 1e-5  # transformers' ChameleonLayerNorm uses this eps regardless of the config


class DecodeLayers(nn.Module):
    """``forward(ids (R, T), positions (R, T), cache) -> final-norm hidden states (R, T, hidden)``.

    ``cache`` is a ``pure_lite.torch_decoder.GroupedKV`` (``update`` writes a layer's keys/values,
    ``attend`` reads them). The qk-norm gains of each layer are joined once, here, on the weights'
    device: build this after the weights are final and in place (the torch backend builds its decoder
    after loading).
    """

    def __init__(self, lm):
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
        half, embed = self.head_dim // 2, self.model.embed_tokens.weight
        self.rotate_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device=embed.device, dtype=embed.dtype)

    def _rms(self, x: torch.Tensor, norm) -> torch.Tensor:
        return torch.rms_norm(x, (x.shape[-1],), norm.weight, self.eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.model.embed_tokens(ids)
        cos, sin = self.model.rotary_emb(hidden, positions)  # (R, T, head_dim), halves repeated
        cos, sin = cos.unsqueeze(2), (sin * self.rotate_sign).unsqueeze(2)
        for i, layer in enumerate(self.model.layers):
            hidden = self._layer(i, layer, hidden, cos, sin, cache)
        return self._rms(hidden, self.model.norm)

    def _layer(self, i: int, layer, x: torch.Tensor, cos, sin, cache) -> torch.Tensor:
        attn, mlp = layer.self_attn, layer.mlp
        h = x if self.swin else self._rms(x, layer.input_layernorm)
        qk_heads = self.heads + self.kv_heads
        if self.joined_qkv[i]:  # fuse_projections: one matmul
            qkv = attn.qkv_proj(h).unflatten(-1, (qk_heads + self.kv_heads, self.head_dim))
            # normalising the value heads too wastes a little arithmetic but spares a copy of the slice
            qk = F.layer_norm(qkv, (self.head_dim,), eps=QK_NORM_EPS)[:, :, :qk_heads]
            value = qkv[:, :, qk_heads:]
        else:
            qk = torch.cat([attn.q_proj(h), attn.k_proj(h)], -1).unflatten(-1, (qk_heads, self.head_dim))
            qk = F.layer_norm(qk, (self.head_dim,), eps=QK_NORM_EPS)
            value = attn.v_proj(h).unflatten(-1, (self.kv_heads, self.head_dim))
        gain, bias = self.qk_norms[i]
        qk = torch.addcmul(bias, qk, gain)
        # rotate_half(x) * sin == (x's halves swapped) * (sin with its first half negated)
        swapped = qk.unflatten(-1, (2, self.head_dim // 2)).flip(-2).flatten(-2)
        qk = torch.addcmul(qk * cos, swapped, sin)
        query, key = qk[:, :, :self.heads].transpose(1, 2), qk[:, :, self.heads:].transpose(1, 2)
        cache.update(key, value.transpose(1, 2), i)
        out = attn.o_proj(cache.attend(i, query, self.scaling).flatten(2))
        x = x + (self._rms(out, layer.input_layernorm) if self.swin else out)
        h = x if self.swin else self._rms(x, layer.post_attention_layernorm)
        if self.joined_gate_up[i]:
            gate, up = mlp.gate_up_proj(h).chunk(2, -1)
        else:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        out = mlp.down_proj(mlp.act_fn(gate) * up)
        return x + (self._rms(out, layer.post_attention_layernorm) if self.swin else out)


def fuse_projections(lm) -> int:
    """Join each layer's query, key and value projections into one linear (``qkv_proj``), and its gate and
    up projections into another (``gate_up_proj``), in place; returns how many were joined.

    Three matmuls become one, and the query and key heads come out side by side for the joint norm:
    fewer, wider kernels per step. Only plain ``nn.Linear`` weights without bias are joined (bitsandbytes'
    packed layers are left as they are); quantize after joining (the torch backend's int4 does). The
    model then serves ``DecodeLayers`` only: transformers' own forward needs the separate projections.
    """
    joined = 0
    for layer in lm.model.layers:
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
