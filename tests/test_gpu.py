"""Checks that need a CUDA GPU (marker ``gpu``); on CPU-only machines they are reported as skipped."""

import numpy as np
import pytest

from pure_lite.sampling import SamplingConfig, cfg_mix, entropy_top_k, softmax_entropy, top_k_keep


def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.mark.gpu
def test_torch_sampler_on_cuda_keeps_the_reference_top_k():
    torch = _cuda()
    from pure_lite.torch_backend import sampler as ts

    rng = np.random.default_rng(0)
    config = SamplingConfig()
    scale = np.array([0.1, 1.0, 3.0, 5.0, 20.0, 1e4, 0.0, 2.0])[:, None]
    cond = (rng.normal(size=(8, 16384)) * scale).astype(np.float32)
    uncond = (rng.normal(size=(8, 16384)) * scale).astype(np.float32)
    mixed_t = ts.cfg_mix(torch.from_numpy(cond).cuda(), torch.from_numpy(uncond).cuda(), config.cfg_scale)
    k_t = ts.entropy_top_k(ts.softmax_entropy(mixed_t), config.k_min, config.k_max)
    keep_t = ts.top_k_mask(mixed_t, k_t, config.k_max).cpu().numpy()
    greedy = ts.image_codes(torch.from_numpy(cond).cuda(), torch.from_numpy(uncond).cuda(),
                            SamplingConfig(temperature=0.0), torch.zeros(8, device="cuda"))[0].cpu()
    for r in range(8):
        mixed = cfg_mix(cond[r], uncond[r], config.cfg_scale)
        k = entropy_top_k(softmax_entropy(mixed), config.k_min, config.k_max)
        assert int(k_t[r]) == k
        np.testing.assert_array_equal(np.flatnonzero(keep_t[r]), top_k_keep(mixed, k))
        assert int(greedy[r]) == int(np.argmax(mixed))


@pytest.mark.gpu
def test_torch_sampler_replays_in_a_cuda_graph_with_fresh_draws():
    """Captured once, replayed 50 times: every replay draws anew from the reference distribution
    (chi-square goodness of fit, rejects at p < 1e-3: false-alarm rate 0.1%)."""
    torch = _cuda()
    from scipy.stats import chi2

    from pure_lite.torch_backend import sampler as ts

    rng = np.random.default_rng(1)
    cond = (rng.normal(size=40) * 2.0).astype(np.float32)
    uncond = (rng.normal(size=40) * 2.0).astype(np.float32)
    config = SamplingConfig(temperature=0.9, k_max=12)
    rows, replays = 256, 50
    static_cond = torch.from_numpy(cond).cuda().expand(rows, -1).contiguous()
    static_uncond = torch.from_numpy(uncond).cuda().expand(rows, -1).contiguous()
    seeds = torch.arange(rows, device="cuda", dtype=torch.int64)
    counter = torch.zeros((), device="cuda", dtype=torch.int64)

    def draw():
        codes = ts.image_codes(static_cond, static_uncond, config, ts.counter_uniforms(seeds, counter))[0]
        counter.add_(1)
        return codes

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as CUDA graphs require
        for _ in range(3):
            draw()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes = draw()
    draws = []
    for _ in range(replays):
        graph.replay()
        draws.append(codes.cpu().numpy().copy())
    draws = np.concatenate(draws)

    mixed = cfg_mix(cond, uncond, config.cfg_scale)
    k = entropy_top_k(softmax_entropy(mixed), config.k_min, config.k_max)
    keep = top_k_keep(mixed, k)
    p = np.zeros(40)
    p[keep] = np.exp((mixed[keep].astype(np.float64) - mixed[keep].max()) / config.temperature)
    expected = p / p.sum() * len(draws)
    counts = np.bincount(draws, minlength=40)
    assert not counts[p == 0].any()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert chi2.sf(float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1) > 1e-3


def _tiny_on_cuda(folder, n: int):
    """The tiny checkpoint's language model on CUDA, its image head and layout, and n prompts of one length."""
    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.prompt import TextTokenizer, prompt_ids
    from pure_lite.tokens import TokenLayout
    from pure_lite.torch_backend.chameleon import ImageHead, load_language_model

    files = CheckpointFiles.locate(folder)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    lm = load_language_model(files, device="cuda")
    tok = TextTokenizer(files.tokenizer)
    prompts = [prompt_ids(tok, layout, layout.encode_image((np.arange(64).reshape(8, 8) * (i + 3)) % layout.codebook_size))
               for i in range(n)]
    return lm, ImageHead(lm, layout.image_ids), layout, prompts


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache", [None, "int8", "int4"])
def test_graph_decoder_matches_eager_on_cuda(tiny_compact, kv_cache):
    """The captured chain (CUDA graphs, bucketed spans) against the eager host loop on the same GPU (greedy:
    identical tokens), and against the eager chain (sampled: identical codes, same kernels); with the KV
    cache in the model's dtype, in int8 and in int4."""
    _cuda()
    from conftest import TARGET

    from pure_lite.generate import generate_batch
    from pure_lite.torch_backend.decoder import TorchDecoder

    lm, head, layout, prompts = _tiny_on_cuda(tiny_compact, 2)

    def run(config, **kw):
        return generate_batch(TorchDecoder(lm, head, "cuda", kv_cache=kv_cache, **kw), prompts, layout, TARGET, config,
                              [np.random.default_rng(s) for s in (3, 4)], max_positions=4096)

    greedy = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=4)
    for a, b in zip(run(greedy, graphs=False, device_loop=False), run(greedy, attend_bucket=16)):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    sampled = SamplingConfig(cfg_scale=0.8, max_text_tokens=4)
    for a, b in zip(run(sampled, graphs=False, attend_bucket=16), run(sampled, attend_bucket=16)):
        np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.gpu
def test_graphs_carry_over_to_the_next_batch_of_the_same_shape(tiny_compact):
    """The second batch of the same shape on one decoder captures nothing new and decodes, greedy, exactly
    what a fresh decoder does (the graphs replay on the refilled buffers)."""
    _cuda()
    from conftest import TARGET

    from pure_lite.generate import generate_batch
    from pure_lite.torch_backend.decoder import TorchDecoder

    lm, head, layout, prompts = _tiny_on_cuda(tiny_compact, 4)
    config = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=0)
    shared = TorchDecoder(lm, head, "cuda", attend_bucket=16)

    def run(decoder, batch):
        return generate_batch(decoder, batch, layout, TARGET, config, [np.random.default_rng(0)] * 2,
                              max_positions=4096)

    run(shared, prompts[:2])
    captured = len(shared.captured)
    assert captured > 0
    second = run(shared, prompts[2:])
    assert len(shared.captured) == captured
    for a, b in zip(second, run(TorchDecoder(lm, head, "cuda", attend_bucket=16), prompts[2:])):
        np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """Widths torchao's int4 layout can pack (multiples of 128), weights at a trained model's scale."""
    from pure_lite.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny256"), seed=1, layout="compact", hidden_size=256,
                                intermediate_size=512, init_std=0.02)


@pytest.mark.gpu
def test_int4_quantizes_the_decoder_and_its_graphs_match_eager(tiny256):
    """quantize_int4 swaps every decoder linear (7 per layer) for torchao's int4 layout and leaves lm_head in
    bf16; the hidden states stay close to bf16's (mean cosine >= 0.95: a group-128 int4 simulation on CPU gives
    0.97, a wrong scale or layout gives ~0), and the captured decode matches the eager one token for token
    (greedy: the same int4 kernels in both). The backend's quantization="int4" loads it that way, with the
    projections joined first; its captured decode matches its eager one too."""
    torch = _cuda()
    pytest.importorskip("torchao", reason="install the [torchao] extra")
    from conftest import TARGET
    from torchao.utils import TorchAOBaseTensor

    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.generate import generate_batch
    from pure_lite.prompt import TextTokenizer, prompt_ids
    from pure_lite.tokens import TokenLayout
    from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
    from pure_lite.torch_backend.decoder import TorchDecoder
    from pure_lite.torch_backend.load import load_components
    from pure_lite.torch_backend.quantize import quantize_int4

    files = CheckpointFiles.locate(tiny256)
    plain = load_language_model(files, device="cuda", dtype=torch.bfloat16)
    lm = load_language_model(files, device="cuda", dtype=torch.bfloat16)
    assert quantize_int4(lm) == 7 * lm.config.num_hidden_layers
    linears = [m for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m.weight, TorchAOBaseTensor) for m in linears)
    assert not isinstance(lm.lm_head.weight, TorchAOBaseTensor) and lm.lm_head.weight.dtype == torch.bfloat16
    ids = torch.arange(200, device="cuda")[None] % lm.config.vocab_size
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(plain.model(ids).last_hidden_state.float(),
                                                       lm.model(ids).last_hidden_state.float(), dim=-1)
    assert 0.95 <= cosine.mean().item() < 0.9999, cosine  # close to bf16, and not untouched

    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    tok = TextTokenizer(files.tokenizer)
    prompts = [prompt_ids(tok, layout, layout.encode_image((np.arange(64).reshape(8, 8) * (i + 3)) % layout.codebook_size))
               for i in range(2)]
    greedy = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=4)

    def run(model, **kw):
        return generate_batch(TorchDecoder(model, ImageHead(model, layout.image_ids), "cuda", **kw), prompts, layout,
                              TARGET, greedy, [np.random.default_rng(s) for s in (3, 4)], max_positions=4096)

    for a, b in zip(run(lm, graphs=False, device_loop=False), run(lm, attend_bucket=16)):
        np.testing.assert_array_equal(a.tokens, b.tokens)

    # the backend joins q/k/v and gate/up (fuse_projections) before quantizing: the joined linears are int4;
    # loading moves a layer at a time (placement.py): the device's peak stays within the memory plan's bound
    from pure_lite.torch_backend import memory

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    components = load_components(tiny256, device="cuda", quantization="int4")
    predicted = memory.peak(memory.model_shape(tiny256, torch.bfloat16), memory.Setting("int4", None), 1)
    assert torch.cuda.max_memory_allocated() - before <= predicted.weights + predicted.codec + predicted.loading
    assert torch.cuda.memory_allocated() - before <= predicted.weights + predicted.codec
    assert "bfloat16, int4" in components.description
    joined = components.new_decoder().lm
    layer = joined.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(linear.weight, TorchAOBaseTensor)
    for a, b in zip(run(joined, graphs=False, device_loop=False), run(joined, attend_bucket=16)):
        np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.gpu
def test_triton_layers_on_cuda(tiny_compact, tiny256):
    """layers="triton" compiled for the GPU: in float32, captured in CUDA graphs, the greedy tokens of the eager
    torch ops (host loop); in fp16 and bf16, eager and captured, with the cache in the model's dtype and in int8,
    logits within their rounding of the torch ops' (cosine >= 0.999 per row, as tests/test_torch_layers.py
    bounds the own forward against transformers')."""
    torch = _cuda()
    pytest.importorskip("triton")
    from conftest import TARGET, probe_logits

    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.generate import generate_batch
    from pure_lite.tokens import TokenLayout
    from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
    from pure_lite.torch_backend.decoder import TorchDecoder
    from pure_lite.torch_backend.layers import fuse_projections

    lm, head, layout, prompts = _tiny_on_cuda(tiny_compact, 2)
    fuse_projections(lm)
    greedy = SamplingConfig(temperature=0, cfg_scale=0.8, max_text_tokens=4)

    def run(**kw):
        return generate_batch(TorchDecoder(lm, head, "cuda", **kw), prompts, layout, TARGET, greedy,
                              [np.random.default_rng(s) for s in (3, 4)], max_positions=4096)

    for a, b in zip(run(graphs=False, device_loop=False), run(layers="triton", attend_bucket=16)):
        np.testing.assert_array_equal(a.tokens, b.tokens)

    for folder, dtype in ((tiny_compact, torch.float16), (tiny256, torch.bfloat16)):
        files = CheckpointFiles.locate(folder)
        layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
        model = load_language_model(files, device="cuda", dtype=dtype)
        fuse_projections(model)
        image_head = ImageHead(model, layout.image_ids)

        def logits(**kw):
            return probe_logits(TorchDecoder(model, image_head, "cuda", **kw), layout)

        for kv_cache in (None, "int8"):  # int8: the Triton path also reads the cache with its own attention kernel
            reference = logits(graphs=False, kv_cache=kv_cache)
            for candidate in (logits(layers="triton", graphs=False, kv_cache=kv_cache),
                              logits(layers="triton", attend_bucket=16, kv_cache=kv_cache)):
                for a, b in zip(reference, candidate):
                    a, b = a.astype(np.float64), b.astype(np.float64)
                    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                    assert cosine.min() >= 0.999, (dtype, kv_cache, cosine.min())
