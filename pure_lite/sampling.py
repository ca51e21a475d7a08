"""PURE's sampler (docs/pure-format.md §5) in NumPy: CFG, structure, entropy-based top-k, temperature.

The decode loop hands the sampler only the logits it may choose from: inside an image
that is the image-token subset (every other id is masked by the structure rule, so
softmax, entropy and top-k over the subset equal those over the full masked vocabulary,
at a quarter of the work). Forced positions (grid sizes, row ends, ``<eoss>``) are never
sampled. Functions here are pure: they never write into the arrays they are given.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ENTROPY_EPS = 1e-10
MAX_CFG_SCALE = 100  # PURE uses 0.8; guidance beyond +-100 only amplifies float32 rounding, then overflows it


@dataclass(frozen=True)
class SamplingConfig:
    """Per-call decoding settings; defaults are the reference's (docs/pure-format.md §5).

    ``temperature=0`` is greedy (argmax after CFG and masking). ``cfg_scale=1`` skips the
    unconditional branch. ``max_text_tokens`` bounds the text before the image: when it is
    spent without an image start, the image is started (a model that talks forever still
    restores). ``max_new_tokens`` bounds text plus image block. ``jacobi_window`` > 0 turns on
    speculative Jacobi decoding with that many draft codes per decoder call (docs/decoding.md):
    the same distribution as plain decoding (greedy: the same tokens, on int8 exports up to
    near-ties: docs/decoding.md, "Determinism") in fewer, wider calls.
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
        for name in ("temperature", "cfg_scale"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(getattr(self, name)).__name__}")
        for name in ("text_top_k", "k_min", "k_max", "max_new_tokens", "max_text_tokens", "jacobi_window"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {type(getattr(self, name)).__name__}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        # logits are float32: a guidance scale far past any useful one overflows them to inf and NaN
        if not -MAX_CFG_SCALE <= self.cfg_scale <= MAX_CFG_SCALE:
            raise ValueError(f"cfg_scale must be a number between -{MAX_CFG_SCALE} and {MAX_CFG_SCALE}, "
                             f"got {self.cfg_scale}")
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
    over the vocabulary. sum(e*z) is a NumPy sum (pairwise), not ``np.dot`` (BLAS, another
    order), so that ``softmax_entropies`` over many rows gives bitwise the same values.
    """
    z = logits - logits.max()
    e = np.exp(z)
    total = float(e.sum())
    return float(np.log(total) - float((e * z).sum()) / total)


def softmax_entropies(scores: np.ndarray) -> np.ndarray:
    """``softmax_entropy`` of each row of (N, C) scores at once: (N,) float64.

    Bitwise equal to ``softmax_entropy`` row by row (tested): the same float32 element-wise
    operations, each row reduced by NumPy's pairwise sum along the contiguous last axis (as a
    1-D sum is), then the same float64 arithmetic. k is a rounding of the entropy, so a
    differently summed entropy would pick another k near a rounding boundary.
    """
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1).astype(np.float64)
    return np.log(total) - (e * z).sum(axis=-1).astype(np.float64) / total


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


def top_k_thresholds(scores: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(N, 1): each row's k-th largest score, ``k`` (N,) per row (the value ``top_k_keep`` compares
    against). One ``partition`` of all rows at the largest k, then a sort of that top slice."""
    n = scores.shape[-1]
    k = np.minimum(np.asarray(k, dtype=np.int64), n)
    width = int(k.max())
    top = scores if width == n else np.partition(scores, n - width, axis=-1)[:, n - width:]
    if (k == width).all():
        return top.min(axis=-1, keepdims=True)
    return np.take_along_axis(np.sort(top, axis=-1), (width - k)[:, None], axis=-1)


def image_distributions(cond: np.ndarray, uncond: np.ndarray | None, config: SamplingConfig):
    """The distribution the image sampler draws from, for a batch of positions.

    ``cond``/``uncond`` are (N, codebook) image-subset logits. Returns (probs (N, codebook)
    float64, entropy (N,) nats): CFG mix, entropy, entropy-based top-k (ties kept) and
    temperature exactly as ``NumpySampler.image_code`` applies them (entropy and k bitwise
    equal); temperature 0, or k = 1, gives a one-hot at the (first) argmax. Speculative
    decoding needs the whole vector (p/q ratios and the residual max(p - q, 0)).
    """
    scores = cond if uncond is None else cfg_mix(cond, uncond, config.cfg_scale)
    entropy = softmax_entropies(scores)
    probs = np.zeros(scores.shape, np.float64)
    k = entropy_top_k(entropy, config.k_min, config.k_max) if config.temperature > 0 else np.ones(len(scores), np.int64)
    greedy = np.flatnonzero(k == 1)
    probs[greedy, scores[greedy].argmax(axis=-1)] = 1.0
    rest = np.flatnonzero(k > 1)
    if rest.size:
        kept = scores[rest]
        weights = kept.astype(np.float64)
        weights -= weights.max(axis=-1, keepdims=True)
        weights /= config.temperature
        weights[kept < top_k_thresholds(kept, k[rest])] = -np.inf
        np.exp(weights, out=weights)
        probs[rest] = weights / weights.sum(axis=-1, keepdims=True)
    return probs, entropy


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn from a probability vector (any non-negative weights)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


class Sampler(Protocol):
    """What the decode loop asks of a sampler, one token at a time on host arrays.

    ``NumpySampler`` is the implementation and the reference; ``pure_lite.torch_backend.sampler`` is the
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
    """The reference sampler in NumPy (CPU).

    One row at a time on purpose: drawing every tile's code of a step in one set of NumPy calls
    was measured (docs/benchmarks.md, "Where a step's time goes") and does not pay. With PURE-tiny's codebook
    (1024) and entropy-based k of several hundred, the work is per element, not per call, and
    a batched draw needs full-width float64 passes that the per-row one avoids (it
    exponentiates and accumulates only the k survivors): 1.5x faster for 8 rows, slower for
    one row, 3x slower for one row of 16384 image tokens.
    """

    def image_code(self, cond, uncond, config, rng):
        scores = cond if uncond is None else cfg_mix(cond, uncond, config.cfg_scale)
        entropy = softmax_entropy(scores)
        k = entropy_top_k(entropy, config.k_min, config.k_max)
        return _sample_top_k(scores, k, config.temperature, rng), entropy

    def text_token(self, logits, banned, config, rng):
        scores = logits.copy()
        scores[banned] = -np.inf
        return _sample_top_k(scores, config.text_top_k, config.temperature, rng)
