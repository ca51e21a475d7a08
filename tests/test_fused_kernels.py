"""pure_lite.torch_backend.fused_kernels, on CPU through Triton's interpreter (tests/conftest.py sets it without a GPU).

- each kernel against plain torch arithmetic written out here: float32 within 1e-5 of the largest value
  (the kernels differ only in rounding order), fp16 within its rounding (2e-3 of the largest); widths that
  are not powers of two, more than one program per row, two cache groups of different capacities and a
  key/value head count below the query's; every cache slot the kernel must not touch keeps its value; the
  int8 attention against SDPA over the dequantized cache;
- the decoder layers with ``kernels="triton"`` against the torch ops (``DecodeLayers``' default), through
  TorchDecoder: every logit of a prefill, a CFG step and a two-token step within 1e-5 of the largest
  (float32; 1% with the int8 cache, read by the int8 attention kernel), and identical greedy tokens
  for whole restorations, host loop and chained loop;
- the models the kernels do not fit are refused with the reason.
The GPU checks (compiled, captured in CUDA graphs) are tests/test_gpu.py's.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is installed with the [test] extra on Linux x86_64")

from conftest import TARGET, probe_logits  # noqa: E402

from pure_lite.checkpoint import CheckpointFiles  # noqa: E402
from pure_lite.generate import generate_batch  # noqa: E402
from pure_lite.prompt import TextTokenizer, prompt_ids  # noqa: E402
from pure_lite.sampling import SamplingConfig  # noqa: E402
from pure_lite.testing import make_tiny_checkpoint  # noqa: E402
from pure_lite.tokens import TokenLayout  # noqa: E402
from pure_lite.torch_backend import fused_kernels as tk  # noqa: E402
from pure_lite.torch_backend.chameleon import ImageHead, load_language_model  # noqa: E402
from pure_lite.torch_backend.decoder import TorchDecoder  # noqa: E402
from pure_lite.torch_backend.kv_cache import quantize_kv  # noqa: E402
from pure_lite.torch_backend.layers import DecodeLayers, fuse_projections  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
_int8_attention = tk.int8_attention


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    assert actual.dtype == dtype and actual.shape == expected.shape
    scale = expected.float().abs().max()
    assert scale > 0.1  # not a vacuous comparison of near-zero values
    assert (actual.float() - expected.float()).abs().max() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_torch(dtype, with_delta):
    gen = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(5, 3, 48, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(48, generator=gen).to(dtype)
    summed, normed = tk.add_rms_norm(x, delta if with_delta else None, weight, 1e-5)
    expected = x + delta if with_delta else x
    assert torch.equal(summed, expected)  # the residual stream is added in its own dtype, as torch adds it
    _close(normed, torch.rms_norm(expected.float(), (48,), weight.float(), 1e-5).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [100, 1500])  # one partial block; two blocks per row
def test_swiglu_matches_torch(dtype, width):
    gate_up = torch.randn(2, 3, 2 * width, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.float().chunk(2, -1)
    _close(tk.swiglu(gate_up), (F.silu(gate) * up).to(dtype), dtype)


def _rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("int8", [False, True])
def test_qk_norm_rope_store_matches_torch(dtype, kv_heads, int8):
    """Two groups (3 conditional rows with 40 slots, 3 unconditional with 24), two tokens per row at
    different slots: queries, the keys and values at their slots, and every other slot untouched. int8: the
    stored values within one step of ``quantize_kv``'s (a last-bit difference before rounding can move one),
    and equal to them in at least 99% of places; the scales within the dtype's rounding."""
    gen = torch.Generator().manual_seed(2)
    rows, tokens, heads, head_dim = 6, 2, 4, 16
    qkv = torch.randn(rows, tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    gain, bias = (torch.randn(heads + kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    angle = torch.rand(rows, tokens, head_dim // 2, generator=gen) * 6
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)  # the kernel takes sin with rotate_half's sign folded in
    signed = sin * torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)]).to(dtype)
    slots = torch.tensor([[0, 1], [7, 8], [38, 39], [0, 1], [5, 6], [22, 23]])
    store = torch.int8 if int8 else dtype
    groups = [torch.full((2, 3, kv_heads, capacity, head_dim), 7, dtype=store) for capacity in (40, 24)]
    scales = [torch.full((2, 3, kv_heads, capacity, 1), 7.0, dtype=dtype) for capacity in (40, 24)] if int8 else None
    query = tk.qk_norm_rope_store(qkv, gain, bias, cos, signed, slots, groups, heads, kv_heads, 1e-5, scales)

    x = qkv.float()
    qk = F.layer_norm(x[:, :, :heads + kv_heads], (head_dim,), eps=1e-5) * gain.float() + bias.float()
    qk = _rotary_reference(qk, cos.float().unsqueeze(2), sin.float().unsqueeze(2))
    _close(query, qk[:, :, :heads].transpose(1, 2).to(dtype), dtype)
    keys, values = qk[:, :, heads:].to(dtype), x[:, :, heads + kv_heads:].to(dtype)
    steps_off = []
    for g, group in enumerate(groups):
        written = torch.zeros(group.shape[:-1], dtype=torch.bool)
        for r in range(3):
            row = 3 * g + r
            for t in range(tokens):
                slot = slots[row, t]
                written[:, r, :, slot] = True
                for which, expected in ((0, keys[row, t]), (1, values[row, t])):
                    stored = group[which, r, :, slot]
                    if not int8:
                        _close(stored, expected, dtype)
                        continue
                    q, scale = quantize_kv(expected, dtype)
                    steps_off.append((stored.int() - q.int()).abs())
                    torch.testing.assert_close(scales[g][which, r, :, slot], scale, rtol=TOLERANCE[dtype], atol=0)
        assert (group[~written] == 7).all()
        if int8:
            assert (scales[g][~written] == 7.0).all()
    if int8:
        off = torch.cat([s.flatten() for s in steps_off])
        assert off.max() <= 1 and (off == 0).float().mean() >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_attention_matches_sdpa_over_the_dequantized_cache(dtype):
    """Three rows at different lengths (one past two 512-key splits), three tokens each, two query heads per
    key/value head, written from row 2 of the output on; against SDPA over the dequantized cache with
    TorchDecoder's mask. float32 within 1e-5 of the largest output; fp16 within 5e-3 (the softmax weights
    are rounded to fp16 before they weight the values, as flash attention does)."""
    gen = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, tokens, head_dim, capacity, span = 3, 4, 2, 3, 16, 1200, 1088
    q8, scales = quantize_kv(torch.randn(2, rows, kv_heads, capacity, head_dim, generator=gen), dtype)
    query = torch.randn(rows, heads, tokens, head_dim, generator=gen).to(dtype)
    slots = torch.tensor([[1080, 1081, 1082], [10, 11, 12], [0, 1, 2]])
    out = torch.full((rows + 2, tokens, heads, head_dim), 7.0, dtype=dtype)
    tk.int8_attention(query, q8, scales, slots, span, head_dim ** -0.5, out, 2)

    dequantized = (q8.float() * scales.float())[:, :, :, :span].repeat_interleave(heads // kv_heads, 2)
    mask = (torch.arange(span) <= slots[:, :, None]).unsqueeze(1)
    expected = F.scaled_dot_product_attention(query.float(), dequantized[0], dequantized[1], attn_mask=mask,
                                              scale=head_dim ** -0.5).transpose(1, 2)
    scale = expected.abs().max()
    assert (out[2:].float() - expected).abs().max() <= (1e-5 if dtype == torch.float32 else 5e-3) * scale
    assert (out[:2] == 7.0).all()
    with pytest.raises(ValueError, match="at most"):
        tk.int8_attention(query.repeat(1, 1, 6, 1), q8, scales, slots.repeat(1, 6), span, 1.0, out, 0)


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """A tiny checkpoint whose heads are 16 wide: the narrowest the int8 attention kernel takes."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_heads16"), layout="compact", hidden_size=64)
    files = CheckpointFiles.locate(folder)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    lm = load_language_model(files).eval()
    fuse_projections(lm)
    tokenizer = TextTokenizer(files.tokenizer)
    prompts = [prompt_ids(tokenizer, layout, layout.encode_image((np.arange(64).reshape(8, 8) * (i + 3))
                                                                  % layout.codebook_size)) for i in range(2)]
    prompts[1] = prompts[1][:-5]  # rows at different positions
    return lm, ImageHead(lm, layout.image_ids), layout, prompts, files


def _logits(compact, layers: str, **kw):
    lm, head, layout, _, _ = compact
    return probe_logits(TorchDecoder(lm, head, layers=layers, **kw), layout, lengths=(7, 4))  # short: interpreted


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_triton_layers_match_the_torch_ops(compact, kv_cache, monkeypatch):
    calls = []
    if kv_cache:  # the int8 cache is read by the Triton attention kernel: count that it is
        monkeypatch.setattr(tk, "int8_attention", lambda *a: calls.append(1) or _int8_attention(*a))
    reference, candidate = _logits(compact, "fused", kv_cache=kv_cache), _logits(compact, "triton", kv_cache=kv_cache)
    # per layer (2): the prefill reads one cache group, the two steps two groups each
    assert len(calls) == (2 * (1 + 2 + 2) if kv_cache else 0)
    tolerance = 0.01 if kv_cache else 1e-5  # int8: a last-bit difference can move a cached value by one step
    for a, b in zip(reference, candidate):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=tolerance * np.abs(a).max())
    assert np.abs(reference[1]).max() > 1


def test_triton_layers_give_the_same_greedy_restoration(compact):
    """A whole restoration (text, then 4x4 codes with CFG; one prompt: the interpreter is slow), greedy: the
    host loop with the torch ops against the chained loop with the Triton kernels, the path a GPU captures.
    (Rows at different positions: test_triton_layers_match_the_torch_ops.)"""
    lm, head, layout, prompts, _ = compact
    config = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=3)

    def run(**kw):
        return generate_batch(TorchDecoder(lm, head, **kw), prompts[:1], layout, TARGET // 2, config,
                              [np.random.default_rng(0)], max_positions=4096)[0]

    reference = run()
    np.testing.assert_array_equal(run(layers="triton", device_loop=True, attend_bucket=16).tokens, reference.tokens)
    assert len(set(reference.tokens.tolist())) > 4  # a varied decode, not one repeated token


def test_triton_kernels_refuse_models_they_do_not_fit(compact, monkeypatch):
    files = compact[4]
    unjoined = load_language_model(files)
    with pytest.raises(ValueError, match="fuse_projections"):
        DecodeLayers(unjoined, kernels="triton")
    unjoined.config.swin_norm = True
    with pytest.raises(ValueError, match="swin"):
        DecodeLayers(unjoined, kernels="triton")
    monkeypatch.setattr(tk, "INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeLayers(compact[0], kernels="triton")
    with pytest.raises(ValueError, match="kernels must be"):
        DecodeLayers(compact[0], kernels="cuda")
