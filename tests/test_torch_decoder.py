"""The torch backend's chained on-device image loop (TorchDecoder.decode_plain_image) against the shared
host loop, on CPU (eager: the same code a CUDA graph captures; tests/test_gpu.py replays it on a GPU).

- greedy: the chained loop gives the host loop's tokens exactly, alone and in a batch with
  different prompt lengths, with and without CFG, and with attention over bucketed spans;
- sampled: the chained loop's codes equal a step-by-step host driver that draws each code with
  ``sampler.image_codes`` at ``counter_uniforms(seed, index)`` (two independent drivers of
  the same maths); a tile's codes do not depend on its batch;
- progress is reported once per image row; cancelling stops the decode.
"""

import numpy as np
import pytest
import torch
from conftest import TARGET

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.errors import GenerationCancelled
from pure_lite.generate import generate_batch
from pure_lite.prompt import TextTokenizer, prompt_ids
from pure_lite.sampling import SamplingConfig
from pure_lite.tokens import LATENT_STRIDE, TokenLayout, image_block_length
from pure_lite.torch_backend import sampler as ts
from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
from pure_lite.torch_backend.decoder import TorchDecoder

SIDE = TARGET // LATENT_STRIDE


@pytest.fixture(scope="module")
def model(tiny_compact):
    files = CheckpointFiles.locate(tiny_compact)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    lm = load_language_model(files)
    tokenizer = TextTokenizer(files.tokenizer)
    prompts = [prompt_ids(tokenizer, layout, layout.encode_image((np.arange(64).reshape(8, 8) * (i + 3))
                                                                  % layout.codebook_size)) for i in range(3)]
    prompts[1] = prompts[1][:-5]  # prompts of different lengths: rows at different positions
    return lm, ImageHead(lm, layout.image_ids), layout, prompts


def _run(model, prompts, config, seeds, **decoder_args):
    lm, head, layout, _ = model
    return generate_batch(TorchDecoder(lm, head, **decoder_args), prompts, layout, TARGET, config,
                          [np.random.default_rng(s) for s in seeds], max_positions=4096)


@pytest.mark.parametrize("cfg_scale", [0.8, 1.0])
def test_chained_greedy_equals_the_host_loop(model, cfg_scale):
    prompts = model[3]
    config = SamplingConfig(temperature=0, cfg_scale=cfg_scale, max_text_tokens=5)
    host = _run(model, prompts, config, [0, 1, 2])
    chained = _run(model, prompts, config, [0, 1, 2], device_loop=True)
    bucketed = _run(model, prompts, config, [0, 1, 2], device_loop=True, attend_bucket=16)
    for h, c, b in zip(host, chained, bucketed):
        np.testing.assert_array_equal(c.tokens, h.tokens)
        np.testing.assert_array_equal(b.tokens, h.tokens)
        np.testing.assert_allclose(c.entropy, h.entropy, atol=1e-4)
        assert c.timings["decoder_calls"] == h.timings["decoder_calls"] == SIDE * SIDE
    assert len({g.tokens.tobytes() for g in host}) > 1


@pytest.mark.parametrize("kv", [None, "int8"])
def test_prefill_in_chunks_equals_one_call(model, monkeypatch, kv):
    """decoder.prefill runs the prompt in calls of PREFILL_CHUNK tokens (what keeps a 512² tile's prefill within
    the memory plan's workspace). With chunks of 5, boundaries inside every prompt and rows of different
    lengths: the prompt's last logits stay within float32 rounding of one call's (1e-4) and the greedy
    restorations are the same."""
    from pure_lite.torch_backend import decoder as decoder_module

    lm, head, layout, prompts = model
    config = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=5)
    whole = TorchDecoder(lm, head, kv_cache=kv).prefill(prompts, 300, 3)
    expected = _run(model, prompts, config, [0, 1, 2], kv_cache=kv)
    longest = max(len(p) for p in prompts)
    assert longest <= decoder_module.PREFILL_CHUNK  # so ``whole`` was one call
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", 5)
    dec = TorchDecoder(lm, head, kv_cache=kv)
    calls = []
    forward = dec._forward
    monkeypatch.setattr(dec, "_forward", lambda x: calls.append(x.shape[1]) or forward(x))
    chunked = dec.prefill(prompts, 300, 3)
    assert calls == [5] * (longest // 5) + ([longest % 5] if longest % 5 else [])
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    for a, b in zip(_run(model, prompts, config, [0, 1, 2], kv_cache=kv), expected):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def _host_driver(model, prompt, config, seed):
    """Step by step through the Decoder protocol, drawing code j with the torch sampler at counter j."""
    lm, head, layout, _ = model
    dec = TorchDecoder(lm, head)
    block = image_block_length(TARGET, TARGET)
    dec.prefill([prompt], len(prompt) + block + 8, 3, unconditional_capacity=block + 3)
    dec.begin_unconditional()
    logits = dec.step(np.tile(layout.header(TARGET, TARGET), (2, 1)), image=True)
    codes = []
    seeds = torch.tensor([ts.fold_seed(seed)])
    for j in range(SIDE * SIDE):
        code, _ = ts.image_codes(torch.from_numpy(logits[:1]), torch.from_numpy(logits[1:]), config,
                                 ts.counter_uniforms(seeds, j))
        codes.append(int(code[0]))
        if j == SIDE * SIDE - 1:
            break
        ids = [int(layout.image_ids[codes[-1]])] + ([layout.row_end] if j % SIDE == SIDE - 1 else [])
        logits = dec.step(np.array([ids, ids]), image=True)
    return np.array(codes)


def test_chained_sampling_equals_a_step_by_step_driver(model):
    lm, head, layout, prompts = model
    config = SamplingConfig(cfg_scale=0.8)
    dec = TorchDecoder(lm, head, device_loop=True)
    block = image_block_length(TARGET, TARGET)
    dec.prefill(prompts[:1], len(prompts[0]) + block + 8, 3, unconditional_capacity=block + 3)
    dec.begin_unconditional()
    codes, entropy, calls = dec.decode_plain_image(layout.header(TARGET, TARGET), SIDE, config, [1234],
                                                   layout.image_ids, layout.row_end)
    expected = _host_driver(model, prompts[0], config, 1234)
    np.testing.assert_array_equal(codes[0], expected)
    assert calls == SIDE * SIDE and entropy.shape == (1, SIDE * SIDE) and (entropy > 0).all()
    assert len(set(expected.tolist())) > 4  # really sampled, not a constant


def test_chained_tile_does_not_depend_on_its_batch(model):
    prompts = model[3]
    config = SamplingConfig(cfg_scale=0.8, max_text_tokens=3)
    batch = _run(model, prompts, config, [5, 6, 7], device_loop=True)
    alone = _run(model, prompts[1:2], config, [6], device_loop=True)[0]
    np.testing.assert_array_equal(batch[1].tokens, alone.tokens)
    assert not np.array_equal(batch[0].codes, batch[2].codes)


def test_progress_per_image_row_and_cancel(model):
    prompts = model[3][:2]
    config = SamplingConfig(cfg_scale=0.8, max_text_tokens=2)
    seen = []
    lm, head, layout, _ = model
    generate_batch(TorchDecoder(lm, head, device_loop=True), prompts, layout, TARGET, config,
                   [np.random.default_rng(s) for s in (1, 2)], max_positions=4096,
                   on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(2 * SIDE * r, 2 * SIDE * SIDE) for r in range(1, SIDE + 1)]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(GenerationCancelled):
        generate_batch(TorchDecoder(lm, head, device_loop=True), prompts, layout, TARGET, config,
                       [np.random.default_rng(s) for s in (1, 2)], max_positions=4096, cancel=cancel)


def test_graphs_need_cuda(model):
    lm, head, _, _ = model
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_gpu.py covers graphs")
    with pytest.raises(ValueError, match="CUDA"):
        TorchDecoder(lm, head, graphs=True)


@pytest.mark.parametrize("window", [0, 4])
def test_fixed_shape_path_equals_eager(model, window):
    """The path CUDA graphs capture (calls padded to power-of-two widths and rewound, device-side lengths,
    bucketed spans), run eagerly on CPU: the same greedy tokens as the eager decoder, through text steps,
    speculative windows (window 4) and the chained image loop (window 0)."""
    lm, head, layout, prompts = model
    config = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=5, jacobi_window=window)
    eager = _run(model, prompts, config, [0, 1, 2])
    fixed = TorchDecoder(lm, head, device_loop=True, attend_bucket=16)
    fixed.graphs = True  # off CUDA, TorchDecoder._replay runs the would-be-captured body eagerly
    out = generate_batch(fixed, prompts, layout, TARGET, config, [np.random.default_rng(s) for s in (0, 1, 2)],
                         max_positions=4096)
    for e, f in zip(eager, out):
        np.testing.assert_array_equal(f.tokens, e.tokens)
    widths = {width for rows, width in fixed.step_inputs}  # the fixed-shape step ran: text at width 1
    assert (3, 1) in fixed.step_inputs and (max(widths) > 1) == (window > 0)


def test_next_batch_of_the_same_shape_reuses_buffers(model):
    """A decoder kept across batches (the next tiles, the next photo) refills the previous batch's buffers,
    which CUDA graphs captured for it replay on, and still decodes exactly what a fresh decoder does;
    a batch of another shape gets new buffers. The eager chained path here is the code the graphs capture."""
    lm, head, layout, prompts = model
    config = SamplingConfig(cfg_scale=0.8, max_text_tokens=3)
    same = [prompts[0], prompts[2]]  # equal lengths: equal cache shapes
    dec = TorchDecoder(lm, head, device_loop=True)

    def decode(batch, seeds):
        return generate_batch(dec, batch, layout, TARGET, config, [np.random.default_rng(s) for s in seeds],
                              max_positions=4096)

    first = decode(same, [5, 6])
    cache, keys, chain = dec.kv, dec.kv.groups[0].kv[0].data_ptr(), dec.chain_cache
    second = decode(same[::-1], [7, 8])
    assert dec.kv is cache and dec.kv.groups[0].kv[0].data_ptr() == keys and dec.chain_cache is chain
    alone = decode(same[:1], [9])
    # a new cache object (its address may be the freed one's: the allocator is free to hand it out again)
    assert dec.kv is not cache and dec.chain_cache is not chain
    for got, seeds, batch in ((first, [5, 6], same), (second, [7, 8], same[::-1]), (alone, [9], same[:1])):
        fresh = _run(model, batch, config, seeds, device_loop=True)
        for g, f in zip(got, fresh):
            np.testing.assert_array_equal(g.tokens, f.tokens)
            np.testing.assert_allclose(g.entropy, f.entropy, atol=1e-6)
    assert not np.array_equal(first[0].codes, second[1].codes)  # same prompt, other seed: really resampled


def test_int8_cache_stores_each_slot_within_half_a_step(model):
    """kv_cache="int8": layer 0's keys and values (computed from the embeddings alone, so the same inputs in both
    decoders) come back from the int8 cache within half a quantization step (absmax / 254) of the float
    cache's, at one byte a value; the next-token logits stay within 0.05 (measured 0.02, logit std 1.1)."""
    lm, head, layout, prompts = model
    caches, logits = [], []
    for int8 in (False, True):
        dec = TorchDecoder(lm, head, kv_cache="int8" if int8 else None)
        dec.prefill(prompts, 200, 4)
        logits.append(dec.step(np.array([[p[-1]] for p in prompts]), image=True))
        caches.append(dec.kv.groups[0])
    exact, stored = caches
    assert stored.kv[0].dtype == torch.int8
    for a, b in zip(exact.read(0), stored.read(0)):
        half_step = a.abs().amax(-1, keepdim=True) / 254
        assert bool(((b - a).abs() <= half_step * 1.001 + 1e-7).all())
        assert not torch.equal(a, b)  # it did quantize
    assert np.abs(logits[1] - logits[0]).max() <= 0.05


def test_int8_cache_chained_and_fixed_shape_paths_equal_the_host_loop(model):
    """With an int8 cache, the chained image loop and the path CUDA graphs capture (bucketed spans, run
    eagerly here) give the host loop's greedy tokens exactly: one cache format for every path."""
    lm, head, layout, prompts = model
    config = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=5)
    host = _run(model, prompts, config, [0, 1, 2], kv_cache="int8")
    chained = _run(model, prompts, config, [0, 1, 2], kv_cache="int8", device_loop=True)
    fixed = TorchDecoder(lm, head, device_loop=True, attend_bucket=16, kv_cache="int8")
    fixed.graphs = True  # off CUDA, TorchDecoder._replay runs the would-be-captured body eagerly
    bucketed = generate_batch(fixed, prompts, layout, TARGET, config, [np.random.default_rng(s) for s in (0, 1, 2)],
                              max_positions=4096)
    for h, c, b in zip(host, chained, bucketed):
        np.testing.assert_array_equal(c.tokens, h.tokens)
        np.testing.assert_array_equal(b.tokens, h.tokens)


def test_int8_cache_keeps_zero_vectors_and_fp16_finite():
    """An all-zero key (a head that has learned to ignore a token) comes back as zeros, not 0/0, in an fp16
    cache as on a GPU; other vectors within half a step."""
    from pure_lite.torch_backend.kv_cache import _Group, quantize_kv

    group = _Group(layers=1, rows=2, heads=2, capacity=4, head_dim=8, dtype=torch.float16, device="cpu", kind="int8")
    group.slots, group.span = torch.tensor([[0, 1], [0, 1]]), 2
    key = torch.randn(2, 2, 2, 8, dtype=torch.float16)
    key[0, 1, 0] = 0
    group.write(0, *quantize_kv(torch.stack([key, key]), torch.float16))
    keys, values = group.read(0)
    assert torch.isfinite(keys).all() and torch.equal(keys[0, 1, 0], torch.zeros(8, dtype=torch.float16))
    half_step = key.float().abs().amax(-1, keepdim=True) / 254
    assert bool(((keys.float() - key.float()).abs() <= half_step * 1.01 + 1e-3).all())


def test_int4_packing_round_trips_every_nibble():
    """pack_int4 / unpack_int4: every pair of values in -8..7 comes back as it went in, two a byte."""
    from pure_lite.torch_backend.kv_cache import pack_int4, unpack_int4

    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.stack(torch.meshgrid(values, values, indexing="ij"), -1).reshape(-1, 2)  # all 256 pairs
    packed = pack_int4(pairs.flatten())
    assert packed.dtype == torch.int8 and packed.numel() == 256
    assert torch.equal(unpack_int4(packed), pairs.flatten())


@pytest.mark.parametrize("head_dim", [64, 48, 8])
def test_int4_cache_stores_each_value_within_half_a_step_of_its_group(head_dim, monkeypatch):
    """int4, in an fp16 cache as on a GPU, with a prompt of one slot and a window of one: the prompt's slot comes
    back rotated (``rotate``) within half an int8 step of its vector (absmax / 127); the next slot, older than the
    window, within half an int4 step of its group (the step (max - min) / 15 over 16 values of a key, 64 of a
    value; 48 is three key groups and one value group of 48, 8 one group of 8); the newest slot exact; an all-zero
    vector comes back as zeros (not 0/0); the groups' scales differ."""
    from pure_lite.torch_backend import kv_cache
    from pure_lite.torch_backend.kv_cache import KV_INT4_KEY_GROUP, KV_INT4_VALUE_GROUP, _Group, rotate

    monkeypatch.setattr(kv_cache, "KV_FLOAT_WINDOW", 1)
    group = _Group(layers=1, rows=2, heads=2, capacity=4, head_dim=head_dim, dtype=torch.float16, device="cpu",
                   kind="int4", prompt=1)
    group.slots, group.span = torch.tensor([[0, 1, 2], [0, 1, 2]]), 3
    gen = torch.Generator().manual_seed(0)
    # per-dimension magnitudes from 0.01 to 10: one scale per head vector would leave the small ones at 0
    key = (torch.randn(2, 2, 3, head_dim, generator=gen) * torch.logspace(-2, 1, head_dim)).half()
    key[0, 1, 1] = 0
    value = -key
    rotated = rotate(torch.stack([key, value]).float())
    group.mark_int4()
    group.write(0, None, None, rotated)
    assert group.kv[0].shape[-1] == head_dim // 2 and group.kv[0].dtype == torch.int8
    assert group.prompt_kv[0].shape[-1] == head_dim and group.prompt_kv[0].dtype == torch.int8
    for written, read, size in zip(rotated, group.read(0), (KV_INT4_KEY_GROUP, KV_INT4_VALUE_GROUP)):
        assert read.dtype == torch.float16 and torch.isfinite(read).all()
        assert torch.equal(read[0, 1, 1], torch.zeros(head_dim, dtype=torch.float16))
        assert torch.equal(read[:, :, 2], written[:, :, 2].half())  # the newest slot: the exact copy
        prompt, was = read[:, :, 0].float(), written[:, :, 0]
        absmax = was.abs().amax(-1, keepdim=True)  # fp16 rounds the scale and the product: 2^-11 each, relative
        assert bool(((prompt - was).abs() <= absmax / 127 / 2 + absmax * 2e-3).all())
        old, was = read[:, :, 1].float(), written[:, :, 1]
        groups = torch.nn.functional.pad(was, (0, -head_dim % size)).unflatten(-1, (-1, size))
        half_step = ((groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 30).expand_as(groups)
        half_step = half_step.flatten(-2)[..., :head_dim]
        assert bool(((old - was).abs() <= half_step * 1.01 + 2e-3).all())
        assert not torch.equal(old, was)  # it did quantize
        assert (old - was).abs().max() > (prompt - written[:, :, 0]).abs().max()  # int4's error above int8's
    if head_dim > KV_INT4_KEY_GROUP:
        key_scales = group.params[0][1, 0, 1, :head_dim // KV_INT4_KEY_GROUP]  # row 1, head 0, slot 1 (after the spare)
        assert bool((key_scales > 0).all()) and len(set(key_scales.tolist())) > 1


def test_int4_ring_falls_back_to_the_int4_copy_where_a_draft_overwrote_it(monkeypatch):
    """The int4 cache's window under SJD's rollback: a draft of three slots overwrites the ring entry of a slot
    one window older; after the draft is cut back to one accepted slot, that older slot is read from its int4 copy
    (not the draft's values), the others in the window exactly, and everything older from int4. The expected span
    is built slot by slot from the written values, independently of the ring."""
    from pure_lite.torch_backend import kv_cache
    from pure_lite.torch_backend.kv_cache import GroupedKV, dequantize_kv_int4, quantize_kv_int4, rotate

    monkeypatch.setattr(kv_cache, "KV_FLOAT_WINDOW", 4)
    heads, head_dim = 2, 16
    cache = GroupedKV(1, heads, head_dim, [(1, 16)], 8, torch.float32, "cpu", "int4")
    group, gen = cache.groups[0], torch.Generator().manual_seed(1)
    final = {}  # slot -> the (2, heads, head_dim) keys and values it holds in the end

    def call(t):
        kv = torch.randn(2, 1, heads, t, head_dim, generator=gen)
        slots = cache.prepare(t, [16])[0].tolist()
        cache.update(kv[0], kv[1], 0)
        for i, slot in enumerate(slots):
            final[slot] = kv[:, 0, :, i]
        return slots

    call(6)  # a prefill: slots 0..5
    cache.advance(6)
    call(3)  # a draft at 6, 7, 8: slot 8 takes slot 4's ring entry
    cache.advance(1)  # one accepted
    assert call(1) == [7]  # the next call rewrites 7; 8 is past the length, never read
    keys, values = group.read(0)
    exact = {5, 6, 7}  # the window is 4..7; 4's entry holds slot 8's draft
    for slot in range(8):
        rotated = rotate(final[slot])
        packed, params = quantize_kv_int4(rotated.unsqueeze(1).unsqueeze(1), torch.float32)
        want = rotated if slot in exact else dequantize_kv_int4(packed, params, head_dim)[:, 0, 0]
        torch.testing.assert_close(torch.stack([keys[0, :, slot], values[0, :, slot]]), want, rtol=0, atol=1e-6)
    assert not torch.allclose(keys[0, :, 4], rotate(final[4])[0])  # slot 4 did come from int4


def test_int4_attention_equals_attention_over_the_unrotated_cache():
    """``GroupedKV.attend`` with an int4 cache rotates the query and the output instead of the span: the same as
    softmax attention (float64, written out) over the cache's own keys and values rotated back."""
    from pure_lite.torch_backend.kv_cache import GroupedKV, rotate

    heads, head_dim, t = 2, 32, 5
    cache = GroupedKV(1, heads, head_dim, [(2, 8)], 8, torch.float32, "cpu", "int4")
    gen = torch.Generator().manual_seed(2)
    cache.prepare(t, [8])
    cache.update(torch.randn(2, heads, t, head_dim, generator=gen), torch.randn(2, heads, t, head_dim, generator=gen), 0)
    query = torch.randn(2, heads, t, head_dim, generator=gen)
    got = cache.attend(0, query, 0.5)
    keys, values = (rotate(x).double() for x in cache.groups[0].read(0))
    scores = query.double() @ keys.transpose(-1, -2) * 0.5 + cache.groups[0].mask.double()
    want = (scores.softmax(-1) @ values).transpose(1, 2)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", [None, "int8", "int4"])
def test_cache_allocates_the_bytes_of_its_layout(kind):
    """Per layer, group, head and slot (keys and values): head_dim values each in the model's dtype; int8
    head_dim bytes and one scale each; int4 the prompt's slots as int8, the others head_dim / 2 bytes each and a
    scale and an offset per 16 values of a key, per 64 of a value (here 128 wide: (64 + (8 + 2) x 2) x 2), one
    spare slot in each part, and its window of exact slots (here the whole capacity)."""
    from pure_lite.torch_backend.kv_cache import GroupedKV

    layers, heads, head_dim, groups = 3, 2, 128, [(2, 40, 10), (2, 24, 0)]
    cache = GroupedKV(layers, heads, head_dim, groups, 4, torch.bfloat16, "cpu", kind)
    int8_slot, int4_slot, exact_slot = 2 * (head_dim + 2), 2 * (head_dim // 2 + (8 + 2) * 2), 2 * head_dim * 2
    if kind == "int4":  # the window holds every slot here (capacity < 136)
        per_row = [(prompt + 1) * int8_slot + (capacity - prompt + 1) * int4_slot + capacity * exact_slot
                   for _, capacity, prompt in groups]
    else:
        per_row = [capacity * (exact_slot if kind is None else int8_slot) for _, capacity, _ in groups]
    expected = sum(layers * rows * heads * n for (rows, _, _), n in zip(groups, per_row))
    allocated = sum(t.numel() * t.element_size() for g in cache.groups
                    for t in g.kv + (g.scales or []) + (g.params or []) + (g.recent or []) + (g.prompt_kv or [])
                    + (g.prompt_scales or []))
    assert allocated == expected


def test_int4_cache_logits_stay_near_the_float_cache(model, monkeypatch):
    """The probe (a prefill, then CFG image steps of one and two tokens) through an int4 cache against the
    float cache. With a window of 2 (nearly every slot read from int4): every logit within 1.0 of the float
    cache's (measured 0.45; logit std 1.1) and the image steps' top-1 the same in at least 9 of 12 rows. A
    loose bound: these heads are 8 wide, one group of 15 levels, and the random weights are far more peaked
    than a trained model's; benchmarks/kv_quant.py measures fidelity on PURE-tiny. With the default window
    (136, longer than the probe) every slot is read exact: the logits equal the float cache's to 1e-4 (the
    rotation's rounding)."""
    from conftest import probe_logits

    from pure_lite.torch_backend import kv_cache

    lm, head, layout, _ = model
    reference, exact = (probe_logits(TorchDecoder(lm, head, kv_cache=kind), layout) for kind in (None, "int4"))
    for a, b in zip(reference, exact):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    monkeypatch.setattr(kv_cache, "KV_FLOAT_WINDOW", 2)
    int4 = probe_logits(TorchDecoder(lm, head, kv_cache="int4"), layout)
    for a, b in zip(reference, int4):
        assert a.shape == b.shape and np.abs(b - a).max() <= 1.0
    assert any(np.abs(b - a).max() > 1e-2 for a, b in zip(reference, int4))  # the cache did quantize
    steps = np.concatenate([reference[1], reference[2]]), np.concatenate([int4[1], int4[2]])
    assert (steps[0].argmax(-1) == steps[1].argmax(-1)).mean() >= 0.75


def test_int4_cache_quantizes_each_call_only_for_the_part_it_writes(model, monkeypatch):
    """The decoder tells the int4 cache which part a call's slots fall in (the prefill: the int8 prompt; a step
    past every row's prompt: the packed part; the first steps of a row with a shorter prompt: both), and the cache
    quantizes only for those. Against a decoder that always says "both": every logit of the probe the same (its
    prompts of 23 and 17 tokens reach all three cases; a window of 2 reads nearly every slot from the parts),
    and two steps after it, with fewer quantizations of each kind."""
    from conftest import probe_logits

    from pure_lite.torch_backend import kv_cache

    lm, head, layout, _ = model
    monkeypatch.setattr(kv_cache, "KV_FLOAT_WINDOW", 2)
    counts = {}
    for name in ("quantize_kv", "quantize_kv_int4"):
        real = getattr(kv_cache, name)
        monkeypatch.setattr(kv_cache, name, lambda *a, _name=name, _real=real, **k:
                            counts.__setitem__(_name, counts.get(_name, 0) + 1) or _real(*a, **k))
    codes = layout.image_ids[np.arange(8).reshape(4, 2)]

    def probe(decoder):  # then two more steps, so the slots the probe's last steps wrote are read from the parts
        first = probe_logits(decoder, layout)
        return first + [decoder.step(codes[:, :1], image=True), decoder.step(codes[:, 1:], image=True)]

    both = TorchDecoder(lm, head, kv_cache="int4")
    decided = both._call
    monkeypatch.setattr(both, "_call", lambda t: (decided(t)[0], ("both",) * len(decided(t)[1])))
    expected = probe(both)
    always, counts = counts, {}
    got = probe(TorchDecoder(lm, head, kv_cache="int4"))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(b, a)
    assert all(0 < counts[name] < always[name] for name in always), (counts, always)


def test_int4_cache_greedy_restoration_runs_on_every_path(model, monkeypatch):
    """With an int4 cache the host loop, the chained image loop and the path CUDA graphs capture (bucketed
    spans, run eagerly here) give the same greedy tokens: one cache format for every path. A window of 8 slots,
    so that most reads come from int4 and the ring wraps many times."""
    from pure_lite.torch_backend import kv_cache

    monkeypatch.setattr(kv_cache, "KV_FLOAT_WINDOW", 8)
    lm, head, layout, prompts = model
    prompts = prompts[:2]  # two rows at different positions are enough here (int8's test runs three)
    config = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=5)
    host = _run(model, prompts, config, [0, 1], kv_cache="int4")
    chained = _run(model, prompts, config, [0, 1], kv_cache="int4", device_loop=True)
    fixed = TorchDecoder(lm, head, device_loop=True, attend_bucket=16, kv_cache="int4")
    fixed.graphs = True  # off CUDA, TorchDecoder._replay runs the would-be-captured body eagerly
    bucketed = generate_batch(fixed, prompts, layout, TARGET, config, [np.random.default_rng(s) for s in (0, 1)],
                              max_positions=4096)
    for h, c, b in zip(host, chained, bucketed):
        assert len(h.codes) and (h.codes >= 0).all()
        np.testing.assert_array_equal(c.tokens, h.tokens)
        np.testing.assert_array_equal(b.tokens, h.tokens)


def test_int4_cache_is_refused_where_it_cannot_run(model):
    lm, head, _, _ = model
    with pytest.raises(ValueError, match="layers='triton' cannot store or read an int4 KV cache"):
        TorchDecoder(lm, head, kv_cache="int4", layers="triton")
    with pytest.raises(ValueError, match="kv_cache must be 'int8', 'int4' or None"):
        TorchDecoder(lm, head, kv_cache="int2")
