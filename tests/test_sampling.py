import math

import numpy as np
import pytest

from pure_lite.generate import generate
from pure_lite.sampling import (NumpySampler, SamplingConfig, cfg_mix, entropy_top_k, image_distributions,
                                softmax_entropies, softmax_entropy, top_k_keep)

from conftest import KINDS, logit_rows


def test_entropy_top_k_worked_values():
    assert [entropy_top_k(h) for h in (0.0, 5.0, math.log(16384), 10.0)] == [14, 1000, 1982, 1987]
    np.testing.assert_array_equal(entropy_top_k(np.array([-3.0, 0.0, 20.0])), [14, 14, 1987])


def test_softmax_entropy_uniform():
    assert softmax_entropy(np.zeros(16384, np.float32)) == pytest.approx(math.log(16384), rel=1e-6)


def test_image_code_keeps_only_top_k():
    # Two groups: 10 high logits, the rest far lower. Low entropy -> small k -> never the low group.
    logits = np.full(1000, -30.0, np.float32)
    logits[:10] = 5.0
    sampler, cfg = NumpySampler(), SamplingConfig(temperature=1.0)
    rng = np.random.default_rng(0)
    draws = {sampler.image_code(logits, None, cfg, rng)[0] for _ in range(300)}
    assert draws <= set(range(10)) and len(draws) > 5


def test_cfg_mix_and_greedy():
    cond = np.array([0.0, 3.0, 1.0], np.float32)
    uncond = np.array([0.0, 10.0, -5.0], np.float32)
    sampler = NumpySampler()
    greedy = SamplingConfig(temperature=0.0, cfg_scale=3.0)
    # 3*(cond-uncond)+uncond = [0, -11, 13] -> code 2 although cond alone prefers 1
    code, _ = sampler.image_code(cond, uncond, greedy, np.random.default_rng(0))
    assert code == 2
    assert sampler.image_code(cond, None, greedy, np.random.default_rng(0))[0] == 1


def test_sampler_does_not_mutate_and_is_seeded():
    logits = np.random.default_rng(1).normal(size=5000).astype(np.float32)
    copy = logits.copy()
    cfg = SamplingConfig()
    a = [NumpySampler().image_code(logits, logits * 0.5, cfg, np.random.default_rng(7))[0] for _ in range(3)]
    NumpySampler().text_token(logits, np.array([0, 1]), cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(logits, copy)
    assert len(set(a)) == 1


def _rows(width, seed):
    """160 CFG-mixable row pairs (N, width): every kind of conftest.logit_rows (scales, ties, flat, peaked)."""
    rng = np.random.default_rng(seed)
    cond = np.concatenate([logit_rows(kind, width, rng) for kind in KINDS])
    uncond = np.concatenate([logit_rows(kind, width, rng) for kind in KINDS])
    return cond, uncond


@pytest.mark.parametrize("width", [1024, 16384])
def test_entropies_of_many_rows_equal_the_per_row_reference_bitwise(width):
    """The vectorised entropy (all rows of a step at once) against ``softmax_entropy`` row by row:
    bitwise equal, so k (a rounding of the entropy) never differs. 320 rows per width."""
    for seed in (0, 1):
        cond, uncond = _rows(width, seed + width)
        scores = cfg_mix(cond, uncond, 0.8)
        batched = softmax_entropies(scores)
        reference = np.array([softmax_entropy(row) for row in scores])
        np.testing.assert_array_equal(batched, reference)
        np.testing.assert_array_equal(entropy_top_k(batched), [entropy_top_k(h) for h in reference])


def test_image_distributions_are_the_reference_sampler():
    """Zero outside the reference's top-k survivors (k from the per-row entropy), its normalised temperature
    weights on them (to 1e-12 relative: the normalising sum runs over the row, not the kept ids)."""
    cond, uncond = _rows(1024, 11)
    config = SamplingConfig(temperature=0.9)
    probs, ents = image_distributions(cond, uncond, config)
    for r, scores in enumerate(cfg_mix(cond, uncond, config.cfg_scale)):
        entropy = softmax_entropy(scores)
        assert ents[r] == entropy
        k = entropy_top_k(entropy)
        keep = [int(np.argmax(scores))] if k == 1 else top_k_keep(scores, k)
        outside = np.ones(len(scores), bool)
        outside[keep] = False
        assert not probs[r, outside].any()
        kept = scores[keep].astype(np.float64)
        weights = np.exp((kept - kept.max()) / config.temperature)
        np.testing.assert_allclose(probs[r, keep], weights / weights.sum(), rtol=1e-12)


def test_config_validation():
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError):
        SamplingConfig(k_min=10, k_max=5)


class FakeDecoder:
    """Random logits where structural and text tokens dominate, so only forcing keeps the block valid."""

    def __init__(self, layout, seed=0):
        self.layout, self.rng = layout, np.random.default_rng(seed)
        self.branches, self.returned, self.fed = 1, [], []

    def _logits(self):
        out = self.rng.normal(size=(self.branches, self.layout.vocab_size)).astype(np.float32)
        out[:, [self.layout.row_end, self.layout.image_end, self.layout.end_of_turn, self.layout.bos]] += 50
        self.returned.append(out)
        return out

    def prefill(self, prompts, capacity, max_step, unconditional_capacity=None):
        return self._logits()

    def begin_unconditional(self):
        self.branches = 2

    def step(self, ids, image=False, all_positions=False):
        ids = np.asarray(ids)
        self.fed.append(ids[0].copy())
        logits = self._logits()
        if all_positions:
            logits = np.repeat(logits[:, None], ids.shape[1], axis=1)
        return self.layout.image_logits(logits) if image else logits

    def rewind(self, counts):
        pass


def test_structure_forced_and_text_greedy(compact_layout):
    L = compact_layout
    dec = FakeDecoder(L)
    cfg = SamplingConfig(max_text_tokens=5)
    gen = generate(dec, np.array([L.bos]), L, 64, cfg, np.random.default_rng(0), max_positions=4096)
    n_text = len(gen.text_tokens)
    assert n_text == 5  # the fake never emits the image start: the budget starts the image
    # Text outside the image: greedy over everything but image/structure tokens.
    banned = np.concatenate([L.image_ids, [L.end_of_turn, L.image_end, L.row_end]])
    for i, tok in enumerate(gen.text_tokens):
        scores = dec.returned[i][0].copy()
        scores[banned] = -np.inf
        assert tok == int(np.argmax(scores))
    block = gen.tokens[n_text:-1]
    codes = L.parse_image(block)  # row ends and <eoss> in place, only image tokens in rows
    np.testing.assert_array_equal(codes, gen.codes)
    assert gen.tokens[-1] == L.end_of_turn
    assert gen.entropy.shape == (8, 8) and np.all(gen.entropy > 0)
    # The unconditional branch was opened exactly when the header was fed.
    np.testing.assert_array_equal(dec.fed[n_text], L.header(64, 64))


def test_budget_too_small_is_a_clear_error(compact_layout):
    from pure_lite.errors import GenerationError

    with pytest.raises(GenerationError, match="image block needs"):
        generate(FakeDecoder(compact_layout), np.array([0]), compact_layout, 64, SamplingConfig(max_new_tokens=20),
                 np.random.default_rng(0), max_positions=4096)
