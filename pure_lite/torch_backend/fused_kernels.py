"""Triton kernels for the torch backend's decode step: a layer's elementwise work in fewer launches, and
attention straight from an int8 KV cache.

Inside a CUDA graph a decode step of the 7B model is ~21 kernels per layer with ``pure_lite.torch_backend.layers``'
torch ops: 4 matmuls, 2 attention calls and ~15 small elementwise kernels that each read a few KB and cost
a launch slot of a few microseconds. These kernels take three groups of them:

- ``add_rms_norm``: the residual add and the next RMSNorm (2 kernels -> 1, twice per layer);
- ``qk_norm_rope_store``: the query/key head norm with its gains, the rotary embedding, and the keys' and
  values' write into the grouped cache at each token's slot (layer_norm, addcmul, mul, flip, addcmul, stack
  and one index write per cache group: 8 kernels -> 1; with an int8 cache its quantization too, ~8 more);
  the queries come out laid out for attention;
- ``swiglu``: ``silu(gate) * up`` (2 -> 1).

A layer is then 11 kernels. Each computes in float32 and rounds once at its output, where the torch ops
round after every op, so the two differ in the last bits (``tests/test_fused_kernels.py`` bounds it).

``int8_attention`` (two launches per cache group) reads an int8 cache's keys and values and their scales
directly, where SDPA needs the span copied out in the model's dtype first (``GroupedKV.attend`` uses it for
decode steps when the decoder was built with ``layers="triton"``).

Triton compiles for CUDA; with ``TRITON_INTERPRET=1`` set before this module is imported the same kernels
run on CPU tensors through Triton's interpreter, which is how the CPU tests check them. Whether they make a
captured step faster is for ``benchmarks/gpu_decode.py`` to say (its ``...-triton`` rows); not yet measured.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available_on(device: torch.device) -> bool:
    """Whether these kernels can run on tensors of ``device``: CUDA, or any device in interpreter mode."""
    return device.type == "cuda" or INTERPRETED


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, x_out_ptr, h_out_ptr, width, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets in int64: a long prefill's rows x width can pass 2**31
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        # added in the storage dtype, as the torch path's ``x + out`` rounds the residual stream
        x = x + tl.load(delta_ptr + row * width + cols, mask=inside, other=0.0)
        tl.store(x_out_ptr + row * width + cols, x, mask=inside)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / width + eps)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(h_out_ptr + row * width + cols, (x * rstd * weight).to(h_out_ptr.dtype.element_ty), mask=inside)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) for x (..., width) contiguous; without ``delta``, (x, rms_norm(x))."""
    width = x.shape[-1]
    rows = x.numel() // width
    summed = torch.empty_like(x) if delta is not None else x
    normed = torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, delta if delta is not None else x, weight, summed, normed, width, eps,
                                  HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(width),
                                  num_warps=8 if width >= 2048 else 4)
    return summed, normed


@triton.jit
def _swiglu_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty),
             mask=inside)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where gate_up (..., 2 * width) holds gate then up (``fuse_projections``' gate_up_proj)."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * width)
    out = gate_up.new_empty(gate_up.shape[:-1] + (width,))
    block = min(1024, triton.next_power_of_2(width))
    _swiglu_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, BLOCK=block)
    return out


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, gain_ptr, bias_ptr, cos_ptr, sin_ptr, slot_ptr, query_ptr,
                               kv0_ptr, kv1_ptr, scale0_ptr, scale1_ptr, rows0, rows1, capacity0, capacity1, tokens,
                               heads, kv_heads, eps, HEAD_DIM: tl.constexpr, HEADS_BLOCK: tl.constexpr,
                               INT8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # row * tokens + t
    row = token // tokens
    t = token % tokens
    # a (HEADS_BLOCK, HEAD_DIM) tile of this token's heads: query heads, then key heads, then value heads
    head = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    all_heads = heads + 2 * kv_heads
    inside = (head < all_heads) & (dims < HEAD_DIM)
    normed_heads = inside & (head < heads + kv_heads)
    base = (token * all_heads + head) * HEAD_DIM
    x = tl.load(qkv_ptr + base + dims, mask=inside, other=0.0).to(tl.float32)
    # query and key heads: layer norm over the head, its per-head gain and bias, then rotary:
    # x * cos + rotate_half(x) * sin, with rotate_half a swap of the halves whose sign the caller folded into sin
    mean = tl.sum(x, 1)[:, None] / HEAD_DIM
    rstd = 1.0 / tl.sqrt(tl.sum((x - mean) * (x - mean), 1)[:, None] / HEAD_DIM + eps)
    swapped = (dims + HEAD_DIM // 2) % HEAD_DIM
    x_swapped = tl.load(qkv_ptr + base + swapped, mask=inside, other=0.0).to(tl.float32)
    gains = head * HEAD_DIM
    normed = (x - mean) * rstd * tl.load(gain_ptr + gains + dims, mask=normed_heads, other=0.0).to(tl.float32) \
        + tl.load(bias_ptr + gains + dims, mask=normed_heads, other=0.0).to(tl.float32)
    normed_swapped = (x_swapped - mean) * rstd \
        * tl.load(gain_ptr + gains + swapped, mask=normed_heads, other=0.0).to(tl.float32) \
        + tl.load(bias_ptr + gains + swapped, mask=normed_heads, other=0.0).to(tl.float32)
    rotated = normed * tl.load(cos_ptr + token * HEAD_DIM + dims).to(tl.float32) \
        + normed_swapped * tl.load(sin_ptr + token * HEAD_DIM + dims).to(tl.float32)
    x = tl.where(normed_heads, rotated, x)
    # queries: (rows, heads, tokens, head_dim), as attention reads them
    tl.store(query_ptr + ((row * heads + head) * tokens + t) * HEAD_DIM + dims, x.to(query_ptr.dtype.element_ty),
             mask=inside & (head < heads))
    # keys (which 0) or values (which 1) of kv head h into the cache of the row's group at the token's slot:
    # a group's tensor is (2, group rows, kv_heads, capacity, head_dim); the first rows0 rows are group 0's
    cached = (head >= heads) & (head < all_heads)  # (HEADS_BLOCK, 1)
    in_group0 = head * 0 + row < rows0
    which = (head - heads) // kv_heads
    h = (head - heads) % kv_heads
    slot = tl.load(slot_ptr + token)
    vector0 = ((which * rows0 + row) * kv_heads + h) * capacity0 + slot  # this head's slot, as (..., capacity)
    vector1 = ((which * rows1 + row - rows0) * kv_heads + h) * capacity1 + slot
    if INT8:
        # as kv_cache.quantize_kv: the value in the model's dtype, absmax / 127 per head vector as its scale,
        # rounded half to even
        x = x.to(scale0_ptr.dtype.element_ty).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(x), 1)[:, None], 1e-8)
        y = x * (127.0 / absmax)
        rounded = tl.floor(y + 0.5)
        rounded = tl.where((rounded - y == 0.5) & (rounded - 2.0 * tl.floor(rounded * 0.5) != 0.0), rounded - 1.0,
                           rounded)
        scale = absmax / 127.0
        tl.store(scale0_ptr + vector0, scale.to(scale0_ptr.dtype.element_ty), mask=cached & in_group0)
        tl.store(scale1_ptr + vector1, scale.to(scale1_ptr.dtype.element_ty), mask=cached & ~in_group0)
        x = rounded
    tl.store(kv0_ptr + vector0 * HEAD_DIM + dims, x.to(kv0_ptr.dtype.element_ty), mask=inside & cached & in_group0)
    tl.store(kv1_ptr + vector1 * HEAD_DIM + dims, x.to(kv1_ptr.dtype.element_ty), mask=inside & cached & ~in_group0)


def qk_norm_rope_store(qkv: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, slots: torch.Tensor, groups: list[torch.Tensor], heads: int,
                       kv_heads: int, eps: float, scales: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Queries (rows, heads, tokens, head_dim) from one layer's joined projections; keys and values stored.

    ``qkv`` (rows, tokens, heads + 2 kv_heads, head_dim), contiguous: the output of ``qkv_proj``. ``gain`` and
    ``bias`` (heads + kv_heads, head_dim): the query and key norms' joined. ``cos``/``sin`` (rows, tokens,
    head_dim) at each token's position, ``sin`` with rotate_half's sign folded in. ``slots`` (rows, tokens):
    each token's cache slot. ``groups``: one layer's key/value tensor of each live cache group,
    (2, group rows, kv_heads, capacity, head_dim), whose rows are ``qkv``'s rows in order. ``scales``: for an
    int8 cache, each group's (2, group rows, kv_heads, capacity, 1) scales in the model's dtype.
    """
    rows, tokens, all_heads, head_dim = qkv.shape
    query = qkv.new_empty((rows, heads, tokens, head_dim))
    first, second = (groups[0], groups[0]) if len(groups) == 1 else groups
    scale0, scale1 = (first, second) if scales is None else (scales[0], scales[-1])  # unused without int8
    rows0 = first.shape[1]
    if len(groups) == 2 and rows0 + second.shape[1] != rows:
        raise ValueError(f"the cache groups hold {rows0} + {second.shape[1]} rows, the call has {rows}")
    # on a GPU a few heads per program spread a step's work over many SMs; the interpreter runs programs one
    # by one in Python, so there every head of a token is one program
    block = triton.next_power_of_2(all_heads) if INTERPRETED else 8
    _qk_norm_rope_store_kernel[(rows * tokens, triton.cdiv(all_heads, block))](
        qkv, gain, bias, cos.contiguous(), sin.contiguous(), slots.contiguous(), query, first, second, scale0, scale1,
        rows0, max(rows - rows0, 1), first.shape[3], second.shape[3], tokens, heads, kv_heads, eps,
        HEAD_DIM=head_dim, HEADS_BLOCK=block, INT8=scales is not None)
    return query


@triton.jit
def _int8_attention_split_kernel(q_ptr, kv_ptr, scale_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr, rows, heads, kv_heads,
                                 capacity, tokens, chunk, scaling, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK: tl.constexpr, IEEE: tl.constexpr):
    program = tl.program_id(0)  # row * heads + head
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row = program // heads
    head = program % heads
    kv_head = head // (heads // kv_heads)
    t = tl.arange(0, TOKENS)
    dims = tl.arange(0, HEAD_DIM)
    real = t < tokens
    # each token sees the slots up to its own: the row's last token bounds the keys any of them reads
    slots = tl.load(slot_ptr + row * tokens + t, mask=real, other=-1)
    start = split * chunk
    end = tl.minimum(start + chunk, tl.max(slots, 0) + 1)
    dtype = q_ptr.dtype.element_ty
    q = tl.load(q_ptr + ((row * heads + head) * tokens + t[:, None]) * HEAD_DIM + dims[None, :],
                mask=real[:, None], other=0.0)
    q = (q.to(tl.float32) * scaling).to(dtype)
    keys = ((0 * rows + row) * kv_heads + kv_head).to(tl.int64) * capacity
    values = ((1 * rows + row) * kv_heads + kv_head).to(tl.int64) * capacity
    best = tl.full((TOKENS,), float("-inf"), tl.float32)
    total = tl.zeros((TOKENS,), tl.float32)
    acc = tl.zeros((TOKENS, HEAD_DIM), tl.float32)
    for first in range(start, end, BLOCK):
        n = first + tl.arange(0, BLOCK)
        inside = n < end
        k = tl.load(kv_ptr + (keys + n[:, None]) * HEAD_DIM + dims[None, :], mask=inside[:, None], other=0)
        k = (k.to(tl.float32) * tl.load(scale_ptr + keys + n, mask=inside, other=0.0).to(tl.float32)[:, None]).to(dtype)
        if IEEE:  # float32 models: no TF32 rounding
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))  # (TOKENS, BLOCK), float32
        scores = tl.where(n[None, :] <= slots[:, None], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a token that has seen nothing yet
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        v = tl.load(kv_ptr + (values + n[:, None]) * HEAD_DIM + dims[None, :], mask=inside[:, None], other=0)
        v = (v.to(tl.float32) * tl.load(scale_ptr + values + n, mask=inside, other=0.0).to(tl.float32)[:, None]).to(dtype)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(p.to(dtype), v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(p.to(dtype), v)
        total = total * rescale + tl.sum(p, 1)
        best = new_best
    partial = (program * splits + split) * tokens + t  # only the real tokens are kept
    tl.store(m_ptr + partial, best, mask=real)
    tl.store(l_ptr + partial, total, mask=real)
    tl.store(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=real[:, None])


@triton.jit
def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, heads, tokens, row_offset, splits,
                              TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr):
    program = tl.program_id(0)  # row * heads + head
    row = program // heads
    head = program % heads
    t = tl.arange(0, TOKENS)
    dims = tl.arange(0, HEAD_DIM)
    real = t < tokens
    best = tl.full((TOKENS,), float("-inf"), tl.float32)
    total = tl.zeros((TOKENS,), tl.float32)
    acc = tl.zeros((TOKENS, HEAD_DIM), tl.float32)
    for split in range(0, splits):  # the splits' softmax partials, merged as the split kernel merges blocks
        partial = (program * splits + split) * tokens + t
        m = tl.load(m_ptr + partial, mask=real, other=float("-inf"))
        new_best = tl.maximum(best, m)
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        old, this = tl.exp(best - shift), tl.exp(m - shift)
        total = total * old + tl.load(l_ptr + partial, mask=real, other=0.0) * this
        acc = acc * old[:, None] + tl.load(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], mask=real[:, None],
                                           other=0.0) * this[:, None]
        best = new_best
    out = acc / tl.where(real, total, 1.0)[:, None]
    # (rows, tokens, heads, head_dim): attention's output as the layer's o_proj reads it
    target = (((row_offset + row) * tokens + t[:, None]) * heads + head) * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + target, out.to(out_ptr.dtype.element_ty), mask=real[:, None])


MAX_ATTENTION_TOKENS = 16  # decode steps and speculative windows (tl.dot's smallest tile); a prefill uses SDPA
MIN_ATTENTION_HEAD_DIM = 16  # tl.dot's smallest inner and outer width on a GPU
ATTENTION_BLOCK = 64  # keys per loop iteration
ATTENTION_CHUNK = 512  # keys per program: a 512² restoration's 8.4k-slot span is 17 programs per row and head


def int8_attention(query: torch.Tensor, kv: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, span: int,
                   scaling: float, out: torch.Tensor, row_offset: int) -> None:
    """Attention of one cache group's queries over its int8 keys and values, dequantized as they are read.

    ``query`` (rows, heads, tokens, head_dim) with tokens <= MAX_ATTENTION_TOKENS; ``kv`` (2, rows, kv_heads,
    capacity, head_dim) int8 and ``scales`` (2, rows, kv_heads, capacity, 1); ``slots`` (rows, tokens): each
    token's slot, which bounds the keys it sees (its own and the earlier ones); ``span``: the slots any row may
    read. Writes rows ``row_offset ..`` of ``out`` (all rows, tokens, heads, head_dim). Split over the keys in
    chunks (flash decoding): a decode step has too few rows and heads to fill a GPU otherwise.

    Why: attention over an int8 cache through SDPA first writes a copy of the span in the model's dtype and
    reads it again, 2.5x the bytes of a cache in that dtype; this reads the int8 cache once, half of them.
    """
    rows, heads, tokens, head_dim = query.shape
    if tokens > MAX_ATTENTION_TOKENS:
        raise ValueError(f"int8_attention takes at most {MAX_ATTENTION_TOKENS} tokens per row, got {tokens}")
    splits = max(1, triton.cdiv(span, ATTENTION_CHUNK))
    chunk = triton.cdiv(triton.cdiv(span, splits), ATTENTION_BLOCK) * ATTENTION_BLOCK
    best = torch.empty((rows * heads, splits, tokens), dtype=torch.float32, device=query.device)
    total = torch.empty_like(best)
    acc = torch.empty((rows * heads, splits, tokens, head_dim), dtype=torch.float32, device=query.device)
    _int8_attention_split_kernel[(rows * heads, splits)](
        query, kv, scales, slots.contiguous(), best, total, acc, rows, heads, kv.shape[2], kv.shape[3], tokens, chunk,
        scaling, TOKENS=MAX_ATTENTION_TOKENS, HEAD_DIM=head_dim, BLOCK=ATTENTION_BLOCK,
        IEEE=query.dtype == torch.float32)
    _attention_combine_kernel[(rows * heads,)](best, total, acc, out, heads, tokens, row_offset, splits,
                                               TOKENS=MAX_ATTENTION_TOKENS, HEAD_DIM=head_dim)
