"""The torch sampler against the NumPy reference (pure_lite.sampling), on CPU.

Exact checks: the CFG-mixed logits, k and the top-k survivors of every row, greedy picks.
Statistical checks: the draws (from ``counter_uniforms``) follow the reference's distribution,
and the uniforms themselves are uniform and independent across seeds and counters. Each
statistical test rejects at p < 1e-3 (false-alarm rate 0.1% per test, 10 tests: at most 1%
for the file if the seeds were random); the seeds are fixed, so a run is deterministic.
"""

import numpy as np
import pytest
import torch
from conftest import KINDS, ROWS, logit_rows
from scipy.stats import chi2

from pure_lite.sampling import NumpySampler, SamplingConfig, cfg_mix, entropy_top_k, softmax_entropy, top_k_keep
from pure_lite.torch_backend import sampler as ts

ALPHA = 1e-3


@pytest.mark.parametrize("width", [16384, 1500])  # 1500 < k_max: some rows keep everything
def test_k_and_survivors_equal_the_reference(width):
    """320 rows per width, CFG-mixed as in an image step: same scores, same k, same kept ids."""
    rng = np.random.default_rng(width)
    config = SamplingConfig()
    rows = 0
    for kind in KINDS:
        cond, uncond = logit_rows(kind, width, rng), logit_rows(kind, width, rng)
        mixed_t = ts.cfg_mix(torch.from_numpy(cond), torch.from_numpy(uncond), config.cfg_scale)
        entropy_t = ts.softmax_entropy(mixed_t)
        k_t = ts.entropy_top_k(entropy_t, config.k_min, config.k_max)
        keep_t = ts.top_k_mask(mixed_t, k_t, config.k_max).numpy()
        for r in range(ROWS):
            mixed = cfg_mix(cond[r], uncond[r], config.cfg_scale)
            np.testing.assert_array_equal(mixed_t[r].numpy(), mixed)
            entropy = softmax_entropy(mixed)
            assert float(entropy_t[r]) == pytest.approx(entropy, abs=1e-5)
            k = entropy_top_k(entropy, config.k_min, config.k_max)
            assert int(k_t[r]) == k, (kind, r)
            np.testing.assert_array_equal(np.flatnonzero(keep_t[r]), top_k_keep(mixed, k), err_msg=f"{kind} row {r}")
            rows += 1
    assert rows == 10 * ROWS


def test_entropy_top_k_worked_values_round_half_to_even():
    h = torch.tensor([-3.0, 0.0, 5.0, float(np.log(16384)), 10.0, 20.0], dtype=torch.float64)
    assert ts.entropy_top_k(h).tolist() == [14, 14, 1000, 1982, 1987, 1987]
    assert ts.entropy_top_k(h, 3, 7).tolist() == entropy_top_k(h.numpy(), 3, 7).tolist()


def test_greedy_equals_argmax_and_the_reference():
    rng = np.random.default_rng(3)
    cond = np.concatenate([logit_rows("ties", 300, rng), logit_rows("unit", 300, rng)])
    uncond = np.concatenate([logit_rows("ties", 300, rng), logit_rows("unit", 300, rng)])
    reference, uniforms = NumpySampler(), _uniforms(len(cond), 0)
    for config in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.9, k_min=1, k_max=1)):
        codes, _ = ts.image_codes(torch.from_numpy(cond), torch.from_numpy(uncond), config, uniforms)
        expected = [reference.image_code(c, u, config, np.random.default_rng(0))[0] for c, u in zip(cond, uncond)]
        assert codes.tolist() == expected
        assert codes.tolist() == np.argmax(cfg_mix(cond, uncond, config.cfg_scale), axis=1).tolist()


class _FixedUniform:
    """Stands in for np.random.Generator: ``random()`` returns the given numbers in turn."""

    def __init__(self, values):
        self.values = iter(values)

    def random(self):
        return float(next(self.values))


def test_a_shared_uniform_picks_the_reference_id():
    """Given the same uniform, the inverse-CDF draw picks the id the NumPy sampler picks (exact except
    where the uniform lands within 1e-9 of a boundary of the cumulative sum: counted, must be rare)."""
    rng = np.random.default_rng(9)
    config, agree, total = SamplingConfig(), 0, 0
    for kind in ("small", "unit", "mid-entropy", "ties", "peaked"):
        cond, uncond = logit_rows(kind, 1024, rng), logit_rows(kind, 1024, rng)
        u = rng.random(ROWS)
        codes, _ = ts.image_codes(torch.from_numpy(cond), torch.from_numpy(uncond), config, torch.from_numpy(u))
        expected = [NumpySampler().image_code(c, q, config, _FixedUniform([x]))[0] for c, q, x in zip(cond, uncond, u)]
        agree += int((codes.numpy() == np.array(expected)).sum())
        total += ROWS
    assert agree >= total - 1, f"{total - agree} of {total} draws differ"


def _uniforms(rows: int, seed: int, counter: int = 0) -> torch.Tensor:
    return ts.counter_uniforms(torch.arange(rows, dtype=torch.int64) + seed, counter)


def test_counter_uniforms_are_uniform_and_independent():
    """200 x 200 (seed, counter) pairs: a 50-bin histogram and the pairs (u[c], u[c+1]) on a 10 x 10 grid
    both pass a chi-square test; values lie in [0, 1) and repeat for the same (seed, counter)."""
    seeds = torch.arange(200, dtype=torch.int64) * 7919 + 3
    u = torch.stack([ts.counter_uniforms(seeds, c) for c in range(200)], dim=1).numpy()  # (seed, counter)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert _chi_square_p(np.bincount((u * 50).astype(int).ravel(), minlength=50), np.full(50, u.size / 50)) > ALPHA
    pairs = (u[:, :-1] * 10).astype(int) * 10 + (u[:, 1:] * 10).astype(int)
    assert _chi_square_p(np.bincount(pairs.ravel(), minlength=100), np.full(100, pairs.size / 100)) > ALPHA
    across = (u[:-1] * 10).astype(int) * 10 + (u[1:] * 10).astype(int)  # neighbouring seeds, same counter
    assert _chi_square_p(np.bincount(across.ravel(), minlength=100), np.full(100, across.size / 100)) > ALPHA
    np.testing.assert_array_equal(ts.counter_uniforms(seeds, 5).numpy(), u[:, 5])
    assert ts.fold_seed(2**40 + 1) != ts.fold_seed(1) and ts.fold_seed(2**64 - 1) < 2**32


def test_inputs_untouched_and_draws_seeded():
    rng = np.random.default_rng(4)
    cond, uncond = torch.from_numpy(logit_rows("unit", 2000, rng)), torch.from_numpy(logit_rows("unit", 2000, rng))
    before = (cond.clone(), uncond.clone())
    draws = [ts.image_codes(cond, uncond, SamplingConfig(), _uniforms(ROWS, 7))[0] for _ in range(2)]
    other = ts.image_codes(cond, uncond, SamplingConfig(), _uniforms(ROWS, 8))[0]
    torch.testing.assert_close((cond, uncond), before, rtol=0, atol=0)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], other)


# --- distributions ---------------------------------------------------------------------------

def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Goodness of fit; categories with expected count < 5 are pooled into one."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(exp) - 1))


def _homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square test that counts a and b come from one distribution."""
    pooled = (a + b) / (a.sum() + b.sum())
    cells = pooled * a.sum() >= 5
    table = np.stack([np.append(a[cells], a[~cells].sum()), np.append(b[cells], b[~cells].sum())]).astype(float)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, table.shape[1] - 1))


def _reference_probabilities(scores: np.ndarray, k: int, temperature: float) -> np.ndarray:
    keep = top_k_keep(scores, k)
    p = np.zeros(scores.shape[-1])
    p[keep] = np.exp((scores[keep].astype(np.float64) - scores[keep].max()) / temperature)
    return p / p.sum()


DRAWS = 40000
REFERENCE_DRAWS = 8000


def _image_case(name):
    rng = np.random.default_rng({"plain": 31, "ties": 32, "hot": 33}[name])
    width = 40
    cond = (rng.normal(size=width) * 2.0).astype(np.float32)
    uncond = (rng.normal(size=width) * 2.0).astype(np.float32)
    if name == "ties":  # integer logits; uncond == cond makes mixed == cond: 14 ids tie for k = 4
        cond = np.round(cond / 2.0).astype(np.float32)
        uncond = cond.copy()
    return cond, uncond


@pytest.mark.parametrize("name, temperature, k_max", [("plain", 0.9, 12), ("ties", 1.0, 30), ("hot", 2.5, 40)])
def test_image_draws_follow_the_reference_distribution(name, temperature, k_max):
    cond, uncond = _image_case(name)
    config = SamplingConfig(temperature=temperature, k_min=1, k_max=k_max)
    mixed = cfg_mix(cond, uncond, config.cfg_scale)
    k = entropy_top_k(softmax_entropy(mixed), config.k_min, config.k_max)
    assert 1 < k < len(mixed)  # the truncation matters in every case
    p = _reference_probabilities(mixed, k, temperature)
    assert (np.count_nonzero(p) > k) == (name == "ties")

    batch = (torch.from_numpy(cond).expand(DRAWS, -1), torch.from_numpy(uncond).expand(DRAWS, -1))
    codes, _ = ts.image_codes(*batch, config, _uniforms(DRAWS, 11))
    counts = np.bincount(codes.numpy(), minlength=len(mixed))
    assert not counts[p == 0].any(), "drew an id outside the top-k"
    assert _chi_square_p(counts, p * DRAWS) > ALPHA

    rng = np.random.default_rng(12)
    reference = [NumpySampler().image_code(cond, uncond, config, rng)[0] for _ in range(REFERENCE_DRAWS)]
    assert _homogeneity_p(counts, np.bincount(reference, minlength=len(mixed))) > ALPHA


def test_chi_square_helpers_reject_a_wrong_distribution():
    """The tests above could fail: the same helpers reject draws at temperature 1.3 against 0.9."""
    cond, uncond = _image_case("plain")
    config, wrong = SamplingConfig(temperature=0.9, k_max=12), SamplingConfig(temperature=1.3, k_max=12)
    mixed = cfg_mix(cond, uncond, config.cfg_scale)
    p = _reference_probabilities(mixed, entropy_top_k(softmax_entropy(mixed), 1, 12), 0.9)
    batch = (torch.from_numpy(cond).expand(DRAWS, -1), torch.from_numpy(uncond).expand(DRAWS, -1))
    off = np.bincount(ts.image_codes(*batch, wrong, _uniforms(DRAWS, 11))[0].numpy(), minlength=len(p))
    right = np.bincount(ts.image_codes(*batch, config, _uniforms(DRAWS, 13))[0].numpy(), minlength=len(p))
    assert _chi_square_p(off, p * DRAWS) < ALPHA
    assert _homogeneity_p(off, right) < ALPHA
