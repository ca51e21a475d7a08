"""The torch decoder's KV cache: two groups of preallocated slots, written by position, optionally int8 or int4.

**Two cache groups.** The conditional rows hold prompt, text and image; the unconditional (CFG) rows
only ever hold the image block, so their group is sized for that. At PURE's 512² that is 4.2k slots
instead of 8.4k per tile: a third less KV memory. **Static shapes**: every buffer is allocated once per
batch and attention reads each group's first ``span`` slots through a mask that admits each row's own
earlier slots, so a decode step has few shapes and each can be captured as a CUDA graph (``decoder.py``).
Transformers' own layers reach the cache through an attention function registered under
``GROUPED_ATTENTION``; the decoder's own layers (``layers.py``) call ``GroupedKV`` directly.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

GROUPED_ATTENTION = "pure_lite_grouped_cache"


def grouped_cache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            grouped_cache=None, **kwargs):
    """The attention function the torch backend registers with transformers.

    With a ``grouped_cache`` (a ``GroupedKV``) it reads that cache; any other caller (training,
    a test's full recompute) gets transformers' own SDPA attention, so the model stays usable.
    """
    if grouped_cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return grouped_cache.attend(module.layer_idx, query, scaling), None


def use_grouped_attention(lm) -> None:
    """Make ``lm``'s layers call ``grouped_cache_attention`` (registered once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_cache_attention)
    if lm.config._attn_implementation != GROUPED_ATTENTION:
        lm.set_attn_implementation(GROUPED_ATTENTION)


KVKind = Literal["int8", "int4"]
KV_INT4_GROUP = 32  # an int4 cache's values per scale along head_dim (the last group of a head may be shorter)


def kv_bytes(layers: int, heads: int, head_dim: int, groups: Sequence[tuple[int, int]], dtype: torch.dtype,
             kind: KVKind | None = None) -> int:
    """Bytes a cache of ``groups`` [(rows, capacity), ...] allocates: what ``_Group`` holds, the one count the
    memory plan (``memory.py``) and the caches agree on.

    Per layer and group a (2, rows, heads, capacity, head_dim) tensor of keys and values: in ``dtype``
    (kind None); int8 with one ``dtype`` scale per head vector; int4 packed two values per byte with one
    ``dtype`` scale per ``KV_INT4_GROUP`` values of a head vector. Per group also its lengths and row
    index (rows int64 each).
    """
    item = dtype.itemsize
    if kind is None:
        per_vector = head_dim * item
    elif kind == "int8":
        per_vector = head_dim + item
    elif kind == "int4":
        per_vector = -(-head_dim // 2) + -(-head_dim // KV_INT4_GROUP) * item
    else:
        raise ValueError(f"kind must be None, 'int8' or 'int4', got {kind!r}")
    return sum(layers * 2 * rows * heads * capacity * per_vector + 2 * rows * 8 for rows, capacity in groups)


class _Group:
    """Keys and values of ``rows`` rows with room for ``capacity`` slots each, and their lengths on the device.

    A layer's keys and values are one tensor, (2, rows, heads, capacity, head_dim), so one index write
    stores both. ``kind="int8"``: store each slot's key and value per head as int8 with one scale (absmax /
    127, in the model's dtype): half the memory of fp16/bf16, which is what a 12 GB card lacks for a 512²
    restoration of the 7B model at 4-bit. ``kind="int4"``: two values a byte (``pack_int4``) with one scale
    per ``KV_INT4_GROUP`` values of a head (absmax / 7): a bit over a quarter of fp16/bf16, what an 8 GB card
    needs. Attention dequantizes the span it reads, so the kernel is unchanged.
    """

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, head_dim: int, dtype, device,
                 kind: KVKind | None = None):
        shape = (2, rows, heads, capacity, head_dim)
        if kind == "int4":
            if head_dim % 2:
                raise ValueError(f"an int4 KV cache packs two values a byte: head_dim {head_dim} is odd")
            values, scales = shape[:-1] + (head_dim // 2,), shape[:-1] + (-(-head_dim // KV_INT4_GROUP),)
        elif kind == "int8":
            values, scales = shape, shape[:-1] + (1,)
        elif kind is None:
            values, scales = shape, None
        else:
            raise ValueError(f"kind must be None, 'int8' or 'int4', got {kind!r}")
        self.kind, self.head_dim = kind, head_dim
        self.kv = [torch.zeros(values, dtype=torch.int8 if kind else dtype, device=device) for _ in range(layers)]
        self.scales = None if scales is None else [torch.zeros(scales, dtype=dtype, device=device)
                                                   for _ in range(layers)]
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.row_index = torch.arange(rows, device=device).unsqueeze(1)
        self.rows, self.capacity = rows, capacity
        self.slots: torch.Tensor | None = None  # (rows, T) slots of this call's tokens
        self.mask: torch.Tensor | None = None  # (rows, 1, T, span): 0 where a new token sees a slot, -inf elsewhere
        self.span = 0

    def write(self, layer: int, kv: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Store keys and values (2, rows, heads, T, head_dim) at this call's slots; quantized with their
        scales when the group is (``quantize_kv``, ``quantize_kv_int4``)."""
        for store, x in ((self.kv, kv), (self.scales, scales)):
            if store is not None:
                store[layer].transpose(2, 3)[:, self.row_index, self.slots] = x.transpose(2, 3)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``span`` slots, in the model's dtype."""
        kv = self.kv[layer][:, :, :, :self.span]
        if self.kind == "int4":
            kv = dequantize_kv_int4(kv, self.scales[layer][:, :, :, :self.span], self.head_dim)
        elif self.scales is not None:  # int8 times the scales promotes to their dtype: one pass for both
            kv = kv * self.scales[layer][:, :, :, :self.span]
        return kv[0], kv[1]


def quantize_kv(kv: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., head_dim) -> int8 values and their scales (..., 1) in ``dtype``: absmax / 127 per vector.

    In float32: fp16 would round a tiny absmax to 0, and an all-zero vector (a head that ignores a
    token) must come back as zeros, not 0/0."""
    x = kv.float()
    absmax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min_(1e-8)
    return (x * (127 / absmax)).round_().to(torch.int8), (absmax / 127).to(dtype)


def _int4_groups(x: torch.Tensor) -> torch.Tensor:
    """(..., head_dim) -> (..., groups, KV_INT4_GROUP), zero-padded when head_dim is not a multiple of it."""
    pad = -x.shape[-1] % KV_INT4_GROUP
    return (F.pad(x, (0, pad)) if pad else x).unflatten(-1, (-1, KV_INT4_GROUP))


def quantize_kv_int4(kv: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., head_dim) -> packed int4 values (..., head_dim / 2) int8 and their scales (..., groups) in ``dtype``.

    Symmetric, -7..7 with absmax / 7 per group of ``KV_INT4_GROUP`` values: zero stays exact and no zero point
    is stored (-8 stays unused, as an absmax / 8 scale would clip the group's largest positive value). One
    scale per group rather than per head vector: a 128-wide head's outliers would otherwise leave most of its
    values in the two or three smallest steps. In float32 as ``quantize_kv``, so an all-zero vector comes back
    as zeros.
    """
    head_dim = kv.shape[-1]
    x = _int4_groups(kv.float())
    absmax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min_(1e-8)
    q = (x * (7 / absmax)).round_().to(torch.int8).flatten(-2)[..., :head_dim]
    return pack_int4(q), (absmax / 7).squeeze(-1).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in -8..7, (..., 2n) -> (..., n) int8: value 2i in the low nibble of byte i, 2i + 1 in the high."""
    pairs = q.unflatten(-1, (-1, 2))
    return (pairs[..., 0] & 15) | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``pack_int4``'s inverse: arithmetic shifts of the int8 bytes sign-extend each nibble."""
    return torch.stack([(packed << 4) >> 4, packed >> 4], -1).flatten(-2)


def dequantize_kv_int4(packed: torch.Tensor, scales: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Packed int4 values (..., head_dim / 2) and their scales (..., groups) -> (..., head_dim) in the scales' dtype."""
    values = _int4_groups(unpack_int4(packed)) * scales.unsqueeze(-1)  # int8 x dtype promotes to the dtype
    return values.flatten(-2)[..., :head_dim]


class GroupedKV:
    """The cache of a batch: group 0 the conditional rows, group 1 (once live) the unconditional rows.

    A token's slot is its position: ``prepare`` places the next T tokens of each row at its
    length, the layers' ``update`` writes their keys/values there, ``attend`` scores each group
    against its first ``span`` slots, and ``advance`` moves the lengths on. Everything reads
    the lengths from the device, so a captured graph replays correctly at any length.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, groups: Sequence[tuple[int, int]], max_new: int,
                 dtype, device, kind: KVKind | None = None, kernels=None):
        self.groups = [_Group(layers, rows, heads, capacity, head_dim, dtype, device, kind)
                       for rows, capacity in groups]
        self.kind, self.dtype = kind, dtype
        self.live = 1
        self.offsets = torch.arange(max_new, device=device)
        # an int8 cache with ``kernels`` (fused_kernels.py, layers="triton"): its int8_attention reads the
        # int8 keys and values directly for calls of up to MAX_ATTENTION_TOKENS tokens per row (not a prefill)
        self.int8_attention: Callable | None = None
        if kind == "int8" and kernels is not None and head_dim >= kernels.MIN_ATTENTION_HEAD_DIM:
            self.int8_attention, self.int8_attention_tokens = kernels.int8_attention, kernels.MAX_ATTENTION_TOKENS
        self.key_index = torch.arange(max(g.capacity for g in self.groups), device=device)
        self.seen = torch.zeros((), dtype=dtype, device=device)
        self.unseen = torch.full((), float("-inf"), dtype=dtype, device=device)

    @property
    def live_groups(self) -> list[_Group]:
        return self.groups[:self.live]

    def prepare(self, t: int, spans: Sequence[int]) -> torch.Tensor:
        """Slots and masks for a call of T tokens per live row; returns the positions (rows, T)."""
        for group, span in zip(self.live_groups, spans):
            group.slots = group.lengths.unsqueeze(1) + self.offsets[:t]
            group.span = span
            # additive, in the model's dtype, made once per call: SDPA would turn a boolean mask into this
            # itself in every layer (a hidden ``where`` per attention call)
            group.mask = torch.where(self.key_index[:span] <= group.slots.unsqueeze(-1), self.seen,
                                     self.unseen).unsqueeze(1)
        return torch.cat([g.slots for g in self.live_groups])

    def layer_buffers(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """One layer's keys and values in each live group, (2, group rows, heads, capacity, head_dim), and
        their scales when the cache is int8: for a kernel that writes this call's slots itself instead of
        through ``update`` (``fused_kernels.qk_norm_rope_store``, which has no int4 store: ``TorchDecoder``
        refuses ``layers="triton"`` with an int4 cache)."""
        if self.kind == "int4":
            raise ValueError("the fused store kernel writes int8 or float caches, not int4")
        groups = self.live_groups
        return [g.kv[layer] for g in groups], [g.scales[layer] for g in groups] if self.kind else None

    def update(self, key, value, layer_idx, *args, **kwargs):
        """Write a layer's keys and values (rows, heads, T, head_dim) of every live row (quantized once for
        all rows when the cache is quantized)."""
        kv, scales = torch.stack([key, value]), None
        if self.kind == "int8":
            kv, scales = quantize_kv(kv, self.dtype)
        elif self.kind == "int4":
            kv, scales = quantize_kv_int4(kv, self.dtype)
        start = 0
        for group in self.live_groups:
            rows = slice(start, start + group.rows)
            group.write(layer_idx, kv[:, rows], None if scales is None else scales[:, rows])
            start += group.rows
        return key, value  # unused: grouped_cache_attention reads the groups

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (rows, heads, T, head_dim) -> (rows, T, heads, head_dim)."""
        rows, heads, t, head_dim = query.shape
        if self.int8_attention is not None and t <= self.int8_attention_tokens:
            joined, start = query.new_empty((rows, t, heads, head_dim)), 0
            for group in self.live_groups:
                self.int8_attention(query[start:start + group.rows], group.kv[layer], group.scales[layer], group.slots,
                                    group.span, scaling, joined, start)
                start += group.rows
            return joined
        out, start = [], 0
        for group in self.live_groups:
            q = query[start:start + group.rows]
            keys, values = group.read(layer)
            out.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask, scale=scaling)
                       .transpose(1, 2))
            start += group.rows
        return torch.cat(out)  # one kernel joins the groups and lays them out (rows, T, heads, head_dim)

    def advance(self, t: int) -> None:
        for group in self.live_groups:
            group.lengths += t

    def reset(self) -> None:
        """Empty every row for a new batch, in place. Stale keys need no clearing: a slot is written
        before any token can see it (the masks only reach slots up to each token's own)."""
        self.live = 1
        for group in self.groups:
            group.lengths.zero_()
