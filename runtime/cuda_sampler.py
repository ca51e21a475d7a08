"""The sampler on a CUDA device with CuPy, behind the same interface as ``NumpySampler``.

Same maths, same order, same float32 entropy formula, and the same host
``numpy.random.Generator`` draw per token, so for the same logits the two keep the same
top-k survivors and, given the same seed, draw the same tokens. Accepts NumPy or CuPy
arrays; returns Python ints. Needs ``cupy`` and a GPU (checked on construction).
"""

from __future__ import annotations

import numpy as np

from pure_lite.errors import MissingDependencyError
from pure_lite.sampling import SamplingConfig, entropy_top_k


class CupySampler:
    def __init__(self) -> None:
        try:
            import cupy as cp

            cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # ImportError, or CUDARuntimeError without a device
            raise MissingDependencyError("the CUDA sampler needs cupy and a CUDA GPU") from exc
        self.cp = cp

    def entropy(self, scores) -> float:
        cp = self.cp
        z = scores - scores.max()
        e = cp.exp(z)
        total = float(e.sum())
        return float(np.log(total) - float(cp.dot(e, z)) / total)

    def top_k_keep(self, scores, k: int):
        cp = self.cp
        n = scores.shape[-1]
        if k >= n:
            return cp.arange(n)
        threshold = cp.partition(scores, n - k)[n - k]
        return cp.flatnonzero(scores >= threshold)

    def _sample(self, scores, k: int, temperature: float, rng: np.random.Generator) -> int:
        cp = self.cp
        if temperature == 0 or k == 1:
            return int(cp.argmax(scores))
        keep = self.top_k_keep(scores, k)
        kept = scores[keep].astype(cp.float64)
        cdf = cp.cumsum(cp.exp((kept - kept.max()) / temperature))
        pick = int(cp.searchsorted(cdf, rng.random() * float(cdf[-1]), side="right"))
        return int(keep[min(pick, len(keep) - 1)])

    def image_code(self, cond, uncond, config: SamplingConfig, rng: np.random.Generator) -> tuple[int, float]:
        cp = self.cp
        cond = cp.asarray(cond)
        scores = cond if uncond is None else config.cfg_scale * (cond - cp.asarray(uncond)) + cp.asarray(uncond)
        entropy = self.entropy(scores)
        k = entropy_top_k(entropy, config.k_min, config.k_max)
        return self._sample(scores, k, config.temperature, rng), entropy

    def text_token(self, logits, banned, config: SamplingConfig, rng: np.random.Generator) -> int:
        cp = self.cp
        scores = cp.array(logits, copy=True)
        scores[cp.asarray(banned)] = -cp.inf
        return self._sample(scores, config.text_top_k, config.temperature, rng)
