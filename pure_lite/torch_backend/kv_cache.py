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
# an int4 cache's values per scale and offset along head_dim: keys finer than values, as PURE-tiny's top-1
# agreement is far more sensitive to the keys' error (docs/gpu.md), and 64 for values is what fits the 7B's
# 8 GB plan under 7.5 GB; the last group of a head may be shorter
KV_INT4_KEY_GROUP, KV_INT4_VALUE_GROUP = 16, 64
# an int4 cache keeps each row's newest slots in the model's dtype as well: two latent rows of the 7B's 512²
# tile (65 slots each) and a few more, where a code's left and upper neighbours are
KV_FLOAT_WINDOW = 136


def _int4_params(head_dim: int) -> int:
    """Values an int4 cache stores per slot and head beside the packed keys and values: a scale and an offset per
    group, keys' groups then values'."""
    return 2 * (-(-head_dim // KV_INT4_KEY_GROUP) + -(-head_dim // KV_INT4_VALUE_GROUP))


def _group_shape(group: Sequence[int]) -> tuple[int, int, int]:
    """(rows, capacity) or (rows, capacity, prompt) -> (rows, capacity, prompt slots held at int8 by int4)."""
    rows, capacity, *prompt = group
    return rows, capacity, min(prompt[0], capacity) if prompt else 0


def kv_bytes(layers: int, heads: int, head_dim: int, groups: Sequence[Sequence[int]], dtype: torch.dtype,
             kind: KVKind | None = None) -> int:
    """Bytes a cache of ``groups`` [(rows, capacity[, prompt]), ...] allocates: what ``_Group`` holds, the one
    count the memory plan (``memory.py``) and the caches agree on.

    Per layer and group a (2, rows, heads, capacity, head_dim) tensor of keys and values: in ``dtype``
    (kind None); int8 with one ``dtype`` scale per head vector; int4: the first ``prompt`` slots as int8 with
    their scales (and one spare slot), the others packed two values a byte with a (rows, heads, slots,
    ``_int4_params``) tensor of ``dtype`` scales and offsets (and one spare slot), and a window of each row's
    newest ``KV_FLOAT_WINDOW`` slots (at most the capacity) in ``dtype`` with their slots (int64). Per group
    also its lengths and row index (rows int64 each).
    """
    item = dtype.itemsize
    if kind not in (None, "int8", "int4"):
        raise ValueError(f"kind must be None, 'int8' or 'int4', got {kind!r}")
    total = 0
    for group in groups:
        rows, capacity, prompt = _group_shape(group)
        vectors = layers * rows * heads * capacity  # per keys and per values
        if kind is None:
            total += 2 * vectors * head_dim * item
        elif kind == "int8":
            total += 2 * vectors * (head_dim + item)
        else:
            window, per_slot = min(KV_FLOAT_WINDOW, capacity), layers * rows * heads
            total += 2 * per_slot * (prompt + 1) * (head_dim + item)
            total += per_slot * (capacity - prompt + 1) * (head_dim + _int4_params(head_dim) * item)
            total += layers * 2 * rows * heads * window * head_dim * item + rows * window * 8
        total += 2 * rows * 8
    return total


class _Group:
    """Keys and values of ``rows`` rows with room for ``capacity`` slots each, and their lengths on the device.

    A layer's keys and values are one tensor, (2, rows, heads, capacity, head_dim), so one index write
    stores both. ``kind="int8"``: store each slot's key and value per head as int8 with one scale (absmax /
    127, in the model's dtype): half the memory of fp16/bf16, which is what a 12 GB card lacks for a 512²
    restoration of the 7B model at 4-bit. ``kind="int4"`` (what an 8 GB card needs): keys and values rotated
    (``rotate``), then two values a byte (``quantize_kv_int4``) with a scale and an offset per group, in
    ``params`` (rows, heads, slots, ``_int4_params``), except the first ``prompt`` slots (the prompt: the LQ
    image's codes, which every restored code reads), which are stored as int8 with a scale per vector
    (``prompt_kv``, ``prompt_scales``; PURE-tiny's top-1 agreement 0.975 -> 0.994, for ~0.4 GB at the 7B's
    512², docs/gpu.md); and each row's newest ``window`` slots also in the
    model's dtype, in a ring (``recent``, slot ``s`` at ``s % window``) whose ``recent_slot`` says which slot
    each entry holds: a decode step reads its neighbours exact, and an entry overwritten by a draft SJD
    rejected, or by a padded prompt, is read from the int4 copy instead. Each part has one spare slot that a
    call's tokens bound for the other part are written to (a write needs no branch, so a graph can capture
    it), never read. Attention dequantizes the span it reads, so the kernel is unchanged.
    """

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, head_dim: int, dtype, device,
                 kind: KVKind | None = None, prompt: int = 0):
        shape = (2, rows, heads, capacity, head_dim)
        self.scales: list[torch.Tensor] | None = None
        self.params: list[torch.Tensor] | None = None
        self.recent: list[torch.Tensor] | None = None
        self.prompt_kv: list[torch.Tensor] | None = None
        self.prompt_scales: list[torch.Tensor] | None = None
        self.prompt = min(prompt, capacity)  # held apart by int4 only
        if kind == "int4":
            if head_dim % 2:
                raise ValueError(f"an int4 KV cache packs two values a byte: head_dim {head_dim} is odd")
            held = (2, rows, heads, self.prompt + 1)  # the prompt's slots and the spare
            self.prompt_kv = [torch.zeros(held + (head_dim,), dtype=torch.int8, device=device) for _ in range(layers)]
            self.prompt_scales = [torch.zeros(held + (1,), dtype=dtype, device=device) for _ in range(layers)]
            packed = capacity - self.prompt + 1  # the spare first, then the slots after the prompt
            values = (2, rows, heads, packed, head_dim // 2)
            self.params = [torch.zeros((rows, heads, packed, _int4_params(head_dim)), dtype=dtype, device=device)
                           for _ in range(layers)]
            self.window = min(KV_FLOAT_WINDOW, capacity)
            self.recent = [torch.zeros((2, rows, heads, self.window, head_dim), dtype=dtype, device=device)
                           for _ in range(layers)]
            self.recent_slot = torch.full((rows, self.window), -1, dtype=torch.int64, device=device)
        elif kind == "int8":
            values = shape
            self.scales = [torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device) for _ in range(layers)]
        elif kind is None:
            values = shape
        else:
            raise ValueError(f"kind must be None, 'int8' or 'int4', got {kind!r}")
        self.kind, self.head_dim = kind, head_dim
        self.kv = [torch.zeros(values, dtype=torch.int8 if kind else dtype, device=device) for _ in range(layers)]
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.row_index = torch.arange(rows, device=device).unsqueeze(1)
        self.rows, self.capacity = rows, capacity
        self.slots: torch.Tensor | None = None  # (rows, T) slots of this call's tokens
        self.mask: torch.Tensor | None = None  # (rows, 1, T, span): 0 where a new token sees a slot, -inf elsewhere
        self.span = 0

    def mark_int4(self, parts: str = "both") -> None:
        """int4, once per call (before any layer writes; every layer then writes the same slots): where each of
        this call's slots goes (the prompt's int8 part or the packed part, the other part's spare slot for the
        rest; ``parts`` says which parts the call reaches, so a decode step past the prompt quantizes only to
        int4 and a prefill only to int8), claim the ring entries of its last ``window`` slots, and work out
        where each layer's read overlays the ring, so the per-layer work of a step is only the copies."""
        self.parts = parts
        in_prompt = self.slots < self.prompt
        self.prompt_index = torch.where(in_prompt, self.slots, self.prompt)
        self.packed_index = torch.where(in_prompt, 0, self.slots - self.prompt + 1)
        t = self.slots.shape[1]
        newest = self.slots[:, max(0, t - self.window):]
        self.ring_written = newest % self.window
        self.recent_slot[self.row_index, self.ring_written] = newest
        # rows shorter than the window overlay their first slots, which their masks hide past their length
        w = min(self.window, self.span)
        end = self.slots[:, -1:] + 1  # (rows, 1): one past each row's newest slot
        self.overlay = end.clamp(min=w) - w + torch.arange(w, device=end.device)
        self.overlay_ring = self.overlay % self.window
        self.overlay_held = (self.recent_slot[self.row_index, self.overlay_ring] == self.overlay)[None, :, :, None, None]

    def write(self, layer: int, kv: torch.Tensor, scales: torch.Tensor | None = None,
              exact: torch.Tensor | None = None) -> None:
        """Store keys and values (2, rows, heads, T, head_dim) at this call's slots; quantized with their
        scales when the group is (``quantize_kv``); int4: ``exact`` (rotated, float32) quantized here,
        int8 for the prompt's slots and int4 for the others, and its last ``window`` slots also in the ring."""
        if self.kind == "int4":
            self._write_int4(layer, exact)
            return
        self.kv[layer].transpose(2, 3)[:, self.row_index, self.slots] = kv.transpose(2, 3)
        if self.scales is not None:
            self.scales[layer].transpose(2, 3)[:, self.row_index, self.slots] = scales.transpose(2, 3)

    def _write_int4(self, layer: int, exact: torch.Tensor) -> None:
        by_slot, dtype = (slice(None), self.row_index), self.params[layer].dtype
        if self.parts != "packed":
            values, scales = quantize_kv(exact, dtype)
            self.prompt_kv[layer].transpose(2, 3)[by_slot + (self.prompt_index,)] = values.transpose(2, 3)
            self.prompt_scales[layer].transpose(2, 3)[by_slot + (self.prompt_index,)] = scales.transpose(2, 3)
        if self.parts != "prompt":
            packed, params = quantize_kv_int4(exact, dtype)
            self.kv[layer].transpose(2, 3)[by_slot + (self.packed_index,)] = packed.transpose(2, 3)
            self.params[layer].transpose(1, 2)[self.row_index, self.packed_index] = params.transpose(1, 2)
        self.recent[layer].transpose(2, 3)[by_slot + (self.ring_written,)] = (
            exact[:, :, :, -self.ring_written.shape[1]:].transpose(2, 3).to(dtype))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``span`` slots, in the model's dtype (int4: rotated, see ``rotate``)."""
        if self.kind == "int4":
            kv = self._read_int4(layer)
        else:
            kv = self.kv[layer][:, :, :, :self.span]
            if self.scales is not None:  # int8 times the scales promotes to their dtype: one pass for both
                kv = kv * self.scales[layer][:, :, :, :self.span]
        return kv[0], kv[1]

    def _read_int4(self, layer: int) -> torch.Tensor:
        """The span, dequantized into one tensor (the prompt's int8 slots, then the packed ones), with each
        row's newest slots replaced by the ring's exact copy where the ring still holds them."""
        head = min(self.span, self.prompt)
        scales = self.prompt_scales[layer]
        kv = torch.empty(scales.shape[:3] + (self.span, self.head_dim), dtype=scales.dtype, device=scales.device)
        torch.mul(self.prompt_kv[layer][:, :, :, :head], scales[:, :, :, :head], out=kv[:, :, :, :head])
        if self.span > head:
            tail = slice(1, self.span - head + 1)  # past the spare
            dequantize_kv_int4(self.kv[layer][:, :, :, tail], self.params[layer][:, :, tail], self.head_dim,
                               out=kv[:, :, :, head:])
        exact = self.recent[layer].transpose(2, 3)[:, self.row_index, self.overlay_ring]  # (2, rows, w, heads, dim)
        view = kv.transpose(2, 3)
        view[:, self.row_index, self.overlay] = torch.where(self.overlay_held, exact,
                                                            view[:, self.row_index, self.overlay])
        return kv

    def reset(self) -> None:
        self.lengths.zero_()
        if self.kind == "int4":
            self.recent_slot.fill_(-1)  # a new batch's padded prompts must not find the last batch's entries


def quantize_kv(kv: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., head_dim) -> int8 values and their scales (..., 1) in ``dtype``: absmax / 127 per vector.

    In float32: fp16 would round a tiny absmax to 0, and an all-zero vector (a head that ignores a
    token) must come back as zeros, not 0/0."""
    x = kv.float()
    absmax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min_(1e-8)
    return (x * (127 / absmax)).round_().to(torch.int8), (absmax / 127).to(dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., head_dim) times a fixed orthogonal, symmetric matrix: block-diagonal Walsh-Hadamard over the
    largest power-of-two block that divides head_dim, scaled by 1/sqrt(block). Its own inverse.

    An int4 cache stores rotated keys and values: a rotation spreads a head's few large channels over all of
    them, so each group's 15 steps are not spent on one outlier (PURE-tiny's top-1 agreement 0.93 -> 0.94
    alone, docs/gpu.md). Attention needs no un-rotation of the span: q.k = (qH).(kH), and the output of
    rotated values is rotated by the same H, so ``GroupedKV.attend`` rotates the query and the output instead.
    Computed as butterflies (log2(block) adds and subtracts), in ``x``'s dtype.
    """
    head_dim = x.shape[-1]
    block = head_dim & -head_dim
    y = x.unflatten(-1, (-1, block))
    h = 1
    while h < block:
        pairs = y.unflatten(-1, (-1, 2, h))
        a, b = pairs.select(-2, 0), pairs.select(-2, 1)
        y = torch.stack([a + b, a - b], -2).flatten(-3)
        h *= 2
    return (y * block ** -0.5).flatten(-2)


def _groups(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., head_dim) -> (..., groups, size), zero-padded when head_dim is not a multiple of it."""
    pad = -x.shape[-1] % size
    return (F.pad(x, (0, pad)) if pad else x).unflatten(-1, (-1, size))


def _quantize_groups(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of float32 ``x`` (..., head_dim) over groups of ``size``: values in -8..7 (..., head_dim)
    and per group a scale (max - min) / 15 and an offset (min + 8 scale), so a value is q * scale + offset. A
    zero point per group costs two bytes and buys a whole step: after the rotation a group is rarely centred
    on zero. A constant group (an all-zero vector too) comes back exact, with scale 0."""
    head_dim, g = x.shape[-1], _groups(x, size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low) / 15
    q = ((g - low) / torch.where(scale > 0, scale, 1)).round_().clamp_(0, 15) - 8
    return q.to(torch.int8).flatten(-2)[..., :head_dim], scale.squeeze(-1), (low + 8 * scale).squeeze(-1)


def quantize_kv_int4(kv: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys and values (2, ..., head_dim) -> packed int4 (2, ..., head_dim / 2) int8 and their
    parameters (..., ``_int4_params``) in ``dtype``: keys' scales and offsets over groups of
    ``KV_INT4_KEY_GROUP``, then values' over ``KV_INT4_VALUE_GROUP``. In float32, as ``quantize_kv``."""
    x = kv.float()
    kq, kscale, koffset = _quantize_groups(x[0], KV_INT4_KEY_GROUP)
    vq, vscale, voffset = _quantize_groups(x[1], KV_INT4_VALUE_GROUP)
    params = torch.cat([kscale, koffset, vscale, voffset], -1).to(dtype)
    return pack_int4(torch.stack([kq, vq])), params


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in -8..7, (..., 2n) -> (..., n) int8: value 2i in the low nibble of byte i, 2i + 1 in the high."""
    pairs = q.unflatten(-1, (-1, 2))
    return (pairs[..., 0] & 15) | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``pack_int4``'s inverse: arithmetic shifts of the int8 bytes sign-extend each nibble."""
    return torch.stack([(packed << 4) >> 4, packed >> 4], -1).flatten(-2)


def dequantize_kv_int4(packed: torch.Tensor, params: torch.Tensor, head_dim: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed int4 keys and values (2, ..., head_dim / 2) and their ``params`` (..., ``_int4_params``) ->
    (2, ..., head_dim) in the parameters' dtype (still rotated). Written into one output (``out``, or a new
    one), a half at a time, so a step's transient memory stays within the one-layer span the memory plan
    reserves (``workspace_bytes``)."""
    if out is None:
        out = torch.empty(packed.shape[:-1] + (head_dim,), dtype=params.dtype, device=packed.device)
    k_params = 2 * -(-head_dim // KV_INT4_KEY_GROUP)
    for half, size, (scale, offset) in ((0, KV_INT4_KEY_GROUP, params[..., :k_params].chunk(2, -1)),
                                        (1, KV_INT4_VALUE_GROUP, params[..., k_params:].chunk(2, -1))):
        values, scale, offset = unpack_int4(packed[half]), scale.unsqueeze(-1), offset.unsqueeze(-1)
        if head_dim % size == 0:
            grouped = out[half].unflatten(-1, (-1, size))
            torch.mul(values.unflatten(-1, (-1, size)), scale, out=grouped)  # int8 x dtype: the dtype
            grouped.add_(offset)
        else:  # a short last group: through a zero-padded copy
            out[half] = torch.addcmul(offset, _groups(values.to(out.dtype), size), scale).flatten(-2)[..., :head_dim]
    return out


class GroupedKV:
    """The cache of a batch: group 0 the conditional rows, group 1 (once live) the unconditional rows.

    A token's slot is its position: ``prepare`` places the next T tokens of each row at its
    length, the layers' ``update`` writes their keys/values there, ``attend`` scores each group
    against its first ``span`` slots, and ``advance`` moves the lengths on. Everything reads
    the lengths from the device, so a captured graph replays correctly at any length. ``groups``:
    (rows, capacity) or (rows, capacity, prompt), the prompt's slots an int4 cache holds at int8.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, groups: Sequence[Sequence[int]], max_new: int,
                 dtype, device, kind: KVKind | None = None, kernels=None):
        self.groups = [_Group(layers, rows, heads, capacity, head_dim, dtype, device, kind, prompt)
                       for rows, capacity, prompt in map(_group_shape, groups)]
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

    def prepare(self, t: int, spans: Sequence[int], parts: Sequence[str] | None = None) -> torch.Tensor:
        """Slots and masks for a call of T tokens per live row; returns the positions (rows, T). ``parts``
        (int4): per live group, which part its slots fall in ("prompt", "packed" or "both", the default), as
        the caller knows from its host lengths."""
        for index, (group, span) in enumerate(zip(self.live_groups, spans)):
            group.slots = group.lengths.unsqueeze(1) + self.offsets[:t]
            group.span = span
            # additive, in the model's dtype, made once per call: SDPA would turn a boolean mask into this
            # itself in every layer (a hidden ``where`` per attention call)
            group.mask = torch.where(self.key_index[:span] <= group.slots.unsqueeze(-1), self.seen,
                                     self.unseen).unsqueeze(1)
            if self.kind == "int4":
                group.mark_int4(parts[index] if parts is not None else "both")
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
        kv, scales, exact = torch.stack([key, value]), None, None
        if self.kind == "int8":
            kv, scales = quantize_kv(kv, self.dtype)
        elif self.kind == "int4":  # each group quantizes its rows: int8 for its prompt's slots, int4 after
            exact = rotate(kv.float())
        start = 0
        for group in self.live_groups:
            rows = slice(start, start + group.rows)
            group.write(layer_idx, kv[:, rows], None if scales is None else scales[:, rows],
                        None if exact is None else exact[:, rows])
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
        if self.kind == "int4":  # the cache holds rotated keys and values (``rotate``)
            query = rotate(query.float()).to(query.dtype)
        out, start = [], 0
        for group in self.live_groups:
            q = query[start:start + group.rows]
            keys, values = group.read(layer)
            out.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask, scale=scaling)
                       .transpose(1, 2))
            start += group.rows
        joined = torch.cat(out)  # one kernel joins the groups and lays them out (rows, T, heads, head_dim)
        return rotate(joined.float()).to(joined.dtype) if self.kind == "int4" else joined

    def advance(self, t: int) -> None:
        for group in self.live_groups:
            group.lengths += t

    def reset(self) -> None:
        """Empty every row for a new batch, in place. Stale keys need no clearing: a slot is written
        before any token can see it (the masks only reach slots up to each token's own)."""
        self.live = 1
        for group in self.groups:
            group.reset()
