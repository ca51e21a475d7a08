"""Batched restorations and speculative Jacobi decoding against plain, one-at-a-time decoding.

Greedy parity runs the real backends (torch and the ONNX runtime, float exports of the tiny
checkpoints). The distribution test runs the shared loop over a NumPy Markov chain whose
exact per-position marginals are known, so SJD's acceptance/resampling is checked against
the truth, not against another sampler.
"""

import numpy as np
import pytest
from scipy import stats

from pure_lite import Restorer, SamplingConfig
from pure_lite.generate import generate, generate_batch
from pure_lite.prompt import prompt_ids
from pure_lite.sampling import image_distributions

from conftest import TARGET


def _prompts(restorer, n):
    """n distinct prompts: different LQ images of the model's input size."""
    c = restorer.components
    rng = np.random.default_rng(42)
    out = []
    for _ in range(n):
        pixels = rng.uniform(-1, 1, (1, 3, TARGET, TARGET)).astype(np.float32)
        out.append(prompt_ids(c.tokenizer, c.layout, c.layout.encode_image(c.codec.encode(pixels))))
    return out


def _decode(restorer, prompts, config, seeds):
    c = restorer.components
    return generate_batch(c.new_decoder(), prompts, c.layout, TARGET, config,
                          [np.random.default_rng(s) for s in seeds], max_positions=c.max_positions)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def restorer(request, tiny_compact, export_compact_float):
    return Restorer.from_pretrained(tiny_compact if request.param == "torch" else export_compact_float)


@pytest.mark.parametrize("cfg_scale", [1.0, 0.8])
def test_batch_equals_alone_greedy(restorer, cfg_scale):
    """Restorations alone and in batches: with PURE's CFG (0.8) eight, in two batches of four and one of eight
    (the tile batches 1, 4, 8); without CFG four, in one batch of four (half the decoding time)."""
    count = 8 if cfg_scale != 1.0 else 4
    prompts = _prompts(restorer, count)
    # max_text_tokens 6: the rows stop writing text at different steps, so padding and rewinds are exercised
    config = SamplingConfig(temperature=0, cfg_scale=cfg_scale, max_text_tokens=6)
    alone = [_decode(restorer, [prompt], config, [i])[0] for i, prompt in enumerate(prompts)]
    for batch in (4, 8)[:count // 4]:
        batched = [g for first in range(0, count, batch)
                   for g in _decode(restorer, prompts[first:first + batch], config, range(first, first + batch))]
        for a, b in zip(alone, batched):
            np.testing.assert_array_equal(b.tokens, a.tokens)
            np.testing.assert_allclose(b.entropy, a.entropy, atol=1e-4)
    assert len({g.tokens.tobytes() for g in alone}) > 1  # the prompts really differ


def test_batch_equals_alone_sampled_same_stream(restorer):
    """Each restoration draws from its own generator: in a batch it makes the same draws as alone."""
    prompts = _prompts(restorer, 3)
    config = SamplingConfig(cfg_scale=0.8, max_text_tokens=4)
    batch = _decode(restorer, prompts, config, [7, 8, 9])
    for i, prompt in enumerate(prompts):
        np.testing.assert_array_equal(batch[i].tokens, _decode(restorer, [prompt], config, [7 + i])[0].tokens)


@pytest.mark.parametrize("window", [3, 4, 16])
def test_jacobi_greedy_equals_plain(restorer, window):
    prompts = _prompts(restorer, 2)
    plain = _decode(restorer, prompts, SamplingConfig(temperature=0, max_text_tokens=4), [0, 1])
    sjd = _decode(restorer, prompts, SamplingConfig(temperature=0, max_text_tokens=4, jacobi_window=window), [0, 1])
    for a, b in zip(plain, sjd):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-4)
        assert b.timings["decoder_calls"] <= a.timings["decoder_calls"]
        assert a.timings["decoder_calls"] == (TARGET // 8) ** 2  # plain: one call per code


class MarkovDecoder:
    """A 'model' in NumPy whose next-code logits depend only on the last token fed.

    After an image token with code c the logits are ``table[c]`` (conditional rows) or
    ``uncond[c]`` (CFG rows); after anything else (header, row end) they are row ``start``.
    Rewinds need no state: the logits depend on the fed ids alone.
    """

    def __init__(self, layout, seed):
        rng = np.random.default_rng(seed)
        n = layout.codebook_size
        self.layout, self.n = layout, n
        self.table = (rng.normal(size=(n + 1, n)) * 2.0).astype(np.float32)  # last row: "start"
        self.uncond = (rng.normal(size=(n + 1, n)) * 2.0).astype(np.float32)
        self.rows = 1

    def _state(self, ids):
        code = self.layout.code_of[ids]
        return np.where(code >= 0, code, self.n)

    def prefill(self, prompts, capacity, max_step, unconditional_capacity=None):
        return np.zeros((len(prompts), self.layout.vocab_size), np.float32)

    def begin_unconditional(self):
        self.rows = 2

    def step(self, ids, image=False, all_positions=False):
        state = self._state(np.asarray(ids))  # (rows, T)
        logits = np.stack([self.table[state[0]]] + ([self.uncond[state[1]]] if self.rows == 2 else []))
        return logits if all_positions else logits[:, -1]

    def rewind(self, counts):
        pass


def _exact_marginals(dec, config, side):
    """P(code at each position) for plain sampling from the Markov chain (row ends restart it)."""
    probs, _ = image_distributions(dec.table, dec.uncond if config.uses_cfg else None, config)  # (n+1, n)
    out, current = [], None
    for j in range(side * side):
        current = probs[-1] if j % side == 0 else current @ probs[:-1]
        out.append(current)
    return np.array(out)


@pytest.mark.parametrize("window", [0, 5])
def test_jacobi_sampling_matches_the_exact_distribution(compact_layout, window):
    """Per-position marginals of many 4x4-code generations against the exact ones.

    One chi-square goodness-of-fit test per position (16) with categories pooled to expected
    counts >= 5, each at alpha = 1e-4: a false alarm in at most 16 * 1e-4 = 0.16% of runs
    (seeds are fixed, so the outcome is deterministic). Window 0 is plain decoding, the control.
    k_max = 20 keeps entropy-based top-k cutting (the codebook has 256 codes).
    """
    side, runs = 4, 3000
    config = SamplingConfig(temperature=0.9, cfg_scale=0.8, k_max=20, max_text_tokens=0, jacobi_window=window)
    dec = MarkovDecoder(compact_layout, seed=3)
    rng = np.random.default_rng(100 + window)
    codes = np.array([generate(dec, np.zeros(1, np.int64), compact_layout, side * 8, config, rng,
                               max_positions=4096).codes.ravel() for _ in range(runs)])
    expected = _exact_marginals(dec, config, side) * runs
    for j in range(side * side):
        counts = np.bincount(codes[:, j], minlength=dec.n).astype(float)
        big = expected[j] >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[j][big], expected[j][~big].sum())
        keep = exp > 0
        assert obs[~keep].sum() == 0, f"position {j}: a code with probability 0 was drawn"
        p = stats.chisquare(obs[keep], exp[keep]).pvalue
        assert p > 1e-4, f"position {j}: chi-square p = {p:.2g}"


def test_jacobi_needs_fewer_calls_where_a_wrong_draft_barely_matters(compact_layout):
    """SJD pays where the output after a wrong draft is still mostly right (models that read a long
    context): then the reused outputs are accepted and a window commits several codes per call."""
    dec = MarkovDecoder(compact_layout, seed=4)
    dec.table = dec.table * 0.1 + dec.table[-1] * 5  # every state close to one peaked distribution
    config = SamplingConfig(cfg_scale=1.0, max_text_tokens=0, jacobi_window=8)
    gen = generate(dec, np.zeros(1, np.int64), compact_layout, 64, config, np.random.default_rng(0), max_positions=4096)
    assert gen.timings["decoder_calls"] < 64 / 2
    assert gen.timings["accepted_per_call"] > 2


def test_jacobi_window_is_validated():
    with pytest.raises(ValueError, match="jacobi_window"):
        SamplingConfig(jacobi_window=-1)
