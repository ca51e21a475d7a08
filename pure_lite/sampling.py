"""PURE's sampler (docs/pure-format.md §5) in NumPy: CFG, structure, entropy-based top-k, temperature.

The decode loop hands the sampler only the logits it may choose from: inside an image
that is the image-token subset (every other id is masked by the structure rule, so
softmax, entropy and top-k over the subset equal those over the full masked vocabulary,
at a quarter of the work). Forced positions (grid sizes, row ends, ``<eoss>``) are never
sampled. Functions here are pure: they never write into the arrays they are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ENTROPY_EPS = 1e-10


@dataclass(frozen=True)
class SamplingConfig:
    """Per-call decoding settings; defaults are the reference's (docs/pure-format.md §5).

    ``temperature=0`` is greedy (argmax after CFG and masking). ``cfg_scale=1`` skips the
    unconditional branch. ``max_text_tokens`` bounds the text before the image: when it is
    spent without an image start, the image is started (a model that talks forever still
    restores). ``max_new_tokens`` bounds text plus image block. ``jacobi_window`` > 0 turns on
    speculative Jacobi decoding with that many draft codes per decoder call (docs/decoding.md):
    the same distribution as plain decoding (greedy: the same tokens) in fewer, wider calls.
    """

    temperature: float = 0.9
    cfg_scale: float = 0.8
    text_top_k: int = 1
    k_min: int = 1
    k_max: int = 2000
    max_new_tokens: int = 8192
    max_text_tokens: int = 512
    jacobi_window: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {self.cfg_scale}")
        if self.text_top_k < 1:
            raise ValueError(f"text_top_k must be >= 1, got {self.text_top_k}")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.max_new_tokens < 1 or self.max_text_tokens < 0:
            raise ValueError("max_new_tokens must be >= 1 and max_text_tokens >= 0")
        if not 0 <= self.jacobi_window <= 256:
            raise ValueError(f"jacobi_window must be between 0 (off) and 256, got {self.jacobi_window}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


def entropy_top_k(entropy, k_min: int = 1, k_max: int = 2000):
    """k for entropy-based top-k: round(k_min + (k_max - k_min) * sigmoid(clip(H, 0, 10) - 5)).

    Rounds half to even (H=5 gives 1000); returns an int for a scalar, an int array otherwise.
    """
    h = np.clip(np.asarray(entropy, dtype=np.float64), 0.0, 10.0)
    k = np.rint(k_min + (k_max - k_min) / (1.0 + np.exp(5.0 - h)))
    k = np.clip(k, k_min, k_max).astype(np.int64)
    return int(k) if k.ndim == 0 else k


def cfg_mix(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: scale * (cond - uncond) + uncond."""
    return scale * (cond - uncond) + uncond


def softmax_entropy(logits: np.ndarray) -> float:
    """Entropy in nats of softmax(logits), computed as ln Z - sum(e*z)/Z in float32.

    This equals the reference's -sum(p * ln(p + 1e-10)) to within V * 1e-10 nats (the
    epsilon only matters where p is below it), at a third of the cost: one exp, no log
    over the vocabulary.
    """
    z = logits - logits.max()
    e = np.exp(z)
    total = float(e.sum())
    return float(np.log(total) - float(np.dot(e, z)) / total)


def top_k_keep(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the logits >= the k-th largest (ties kept), in index order."""
    n = logits.shape[-1]
    if k >= n:
        return np.arange(n)
    threshold = np.partition(logits, n - k)[n - k]
    return np.flatnonzero(logits >= threshold)


def _sample_top_k(logits: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> int:
    """Keep logits >= the k-th largest (ties kept), apply temperature, draw one index."""
    if temperature == 0 or k == 1:
        return int(np.argmax(logits))
    keep = top_k_keep(logits, k)
    kept = logits[keep].astype(np.float64)
    cdf = np.cumsum(np.exp((kept - kept.max()) / temperature))
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(keep[min(pick, len(keep) - 1)])


def image_distributions(cond: np.ndarray, uncond: np.ndarray | None, config: SamplingConfig):
    """The distribution the image sampler draws from, for a batch of positions.

    ``cond``/``uncond`` are (N, codebook) image-subset logits. Returns (probs (N, codebook)
    float64, entropy (N,) nats): CFG mix, entropy, entropy-based top-k (ties kept) and
    temperature exactly as ``NumpySampler.image_code`` applies them; temperature 0 gives a
    one-hot at the argmax. Speculative decoding needs the whole vector (p/q ratios and the
    residual max(p - q, 0)), the plain sampler only one draw from it.
    """
    scores = cond if uncond is None else cfg_mix(cond, uncond, config.cfg_scale)
    # Row by row with the plain sampler's own function: near a rounding boundary of k a
    # differently summed entropy would pick another k, and another distribution.
    entropy = np.array([softmax_entropy(row) for row in scores], np.float64)
    probs = np.zeros(scores.shape, np.float64)
    if config.temperature == 0:
        probs[np.arange(len(scores)), scores.argmax(axis=-1)] = 1.0
        return probs, entropy
    for row, k in enumerate(np.atleast_1d(entropy_top_k(entropy, config.k_min, config.k_max))):
        if k == 1:  # as _sample_top_k: the first maximum, even among ties
            probs[row, scores[row].argmax()] = 1.0
            continue
        keep = top_k_keep(scores[row], int(k))
        kept = scores[row, keep].astype(np.float64)
        weights = np.exp((kept - kept.max()) / config.temperature)
        probs[row, keep] = weights / weights.sum()
    return probs, entropy


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn from a probability vector (any non-negative weights)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


class Sampler(Protocol):
    """What the decode loop asks of a sampler, one token at a time on host arrays.

    ``NumpySampler`` is the implementation and the reference; ``pure_lite.torch_sampler`` is the
    same maths on batched device tensors, for a decode step that stays on the GPU.
    """

    def image_code(
        self, cond: np.ndarray, uncond: np.ndarray | None, config: SamplingConfig, rng: np.random.Generator
    ) -> tuple[int, float]:
        """Draw one VQ code from image-subset logits; returns (code, entropy in nats)."""
        ...

    def text_token(
        self, logits: np.ndarray, banned: np.ndarray, config: SamplingConfig, rng: np.random.Generator
    ) -> int:
        """Draw one text token from full-vocabulary logits, never one of ``banned``."""
        ...


class NumpySampler:
    """The reference sampler in NumPy (CPU)."""

    def image_code(self, cond, uncond, config, rng):
        scores = cond if uncond is None else cfg_mix(cond, uncond, config.cfg_scale)
        entropy = softmax_entropy(scores)
        k = entropy_top_k(entropy, config.k_min, config.k_max)
        return _sample_top_k(scores, k, config.temperature, rng), entropy

    def text_token(self, logits, banned, config, rng):
        scores = logits.copy()
        scores[banned] = -np.inf
        return _sample_top_k(scores, config.text_top_k, config.temperature, rng)
