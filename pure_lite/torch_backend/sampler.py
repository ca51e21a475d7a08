"""PURE's sampler (docs/pure-format.md §5) in torch, on batched (B, C) logits, on whatever device they live on.

The same maths as ``pure_lite.sampling`` (the NumPy reference), written so a CUDA graph can
capture it: no ``.item()``, no shapes that depend on values, no Python branch on a tensor
(only on the config). Per row, k is a tensor; the top-k threshold is gathered at index k-1 of
one ``topk(k_max)``; the draw inverts the cumulative sum of the kept weights at one uniform
number per row, exactly as the reference does with its own generator's number.

The uniforms come from ``counter_uniforms``: a hash of (the restoration's seed, the code's
index), not from a generator's state. So a replayed graph draws fresh numbers without
registering generator state, every row has its own stream (a tile's codes do not depend on
the batch it decodes in), and CPU and GPU draw the same numbers.

Entropy and probabilities are computed in float64 where the device has it (float32 on MPS):
the reference's entropy is float32 with NumPy's summation order, so float64 here keeps the
two within ~1e-7 nats, and k (a rounding of a function of the entropy) agrees with it
except within that distance of a rounding boundary. The top-k survivors compare the input
logits themselves, so for equal k they are identical. Nothing here writes into its inputs.

Imported only by torch code: ``import pure_lite`` never loads this module.
"""

from __future__ import annotations

import torch

from ..sampling import SamplingConfig

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (xor-shift, multiply, twice) on int64 tensors holding values < 2**32.

    Products stay below 2**59, so int64 never overflows on any device.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def fold_seed(seed: int) -> int:
    """A seed of any size as the 32-bit value ``counter_uniforms`` takes."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return (seed ^ (seed >> 32)) & _MASK32


def counter_uniforms(seeds: torch.Tensor, counter: torch.Tensor | int) -> torch.Tensor:
    """(B,) uniforms in [0, 1) with 53 random bits, a pure function of (seeds[b], counter).

    ``seeds``: int64 values < 2**32 (``fold_seed``); ``counter``: an int64 tensor (scalar or
    (B,)) or an int, e.g. the index of the code being drawn. Two hashes of the counter under
    the seed's hash give the high 32 and low 21 bits.
    """
    base = _mix32(seeds)
    counter = torch.as_tensor(counter, dtype=torch.int64, device=seeds.device) & 0x7FFFFFFF
    high = _mix32(base ^ _mix32(2 * counter))
    low = _mix32(base ^ _mix32(2 * counter + 1)) >> 11
    wide = _wide(seeds.device)
    return (high * 2097152 + low).to(wide) / 9007199254740992.0  # (high * 2**21 + low) / 2**53


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: scale * (cond - uncond) + uncond, in the logits' dtype."""
    return scale * (cond - uncond) + uncond


def softmax_entropy(scores: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B,) entropy in nats of their softmax, as ln Z - sum(e*z)/Z (see sampling.py)."""
    z = (scores - scores.amax(dim=-1, keepdim=True)).to(_wide(scores.device))
    e = torch.exp(z)
    total = e.sum(dim=-1)
    return torch.log(total) - (e * z).sum(dim=-1) / total


def entropy_top_k(entropy: torch.Tensor, k_min: int = 1, k_max: int = 2000) -> torch.Tensor:
    """(B,) entropies -> (B,) int64 k = round(k_min + (k_max - k_min) * sigmoid(clip(H, 0, 10) - 5)).

    ``torch.round`` rounds half to even, like ``numpy.rint`` in the reference.
    """
    h = entropy.to(_wide(entropy.device)).clamp(0.0, 10.0)
    k = torch.round(k_min + (k_max - k_min) / (1.0 + torch.exp(5.0 - h)))
    return k.clamp(k_min, k_max).to(torch.int64)


def top_k_mask(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """(B, C) bool: logits >= the row's k-th largest (ties kept); every k must be <= k_max.

    One ``topk`` of static width min(k_max, C) per call; a k beyond C keeps the whole row.
    """
    width = min(k_max, scores.shape[-1])
    top = torch.topk(scores, width, dim=-1, sorted=True).values  # (B, width), descending
    index = (k.clamp(1, width) - 1).unsqueeze(-1)  # (B, 1)
    return scores >= top.gather(-1, index)


def draw(scores: torch.Tensor, keep: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """(B,) ids drawn from softmax(scores / temperature) restricted to ``keep``; temperature > 0.

    The kept weights' cumulative sum in index order is searched at uniforms * total, as the
    reference does over its kept ids: given the same uniform, both pick the same id (up to the
    last bits of the sums). Masked ids add zero weight and so can never be picked.
    """
    wide = _wide(scores.device)
    z = (scores - scores.amax(dim=-1, keepdim=True)).to(wide) / temperature
    weights = torch.exp(z).masked_fill(~keep, 0.0)
    cdf = torch.cumsum(weights, dim=-1)
    target = (uniforms.to(wide) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp(max=scores.shape[-1] - 1)


def image_codes(
    cond: torch.Tensor, uncond: torch.Tensor | None, config: SamplingConfig, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one VQ code per row from (B, codebook) image-subset logits, with one uniform per row.

    Returns ((B,) int64 codes, (B,) entropies in nats, float64 except on MPS). Without CFG the
    caller passes ``uncond=None``, as to the reference. The reference takes the argmax (the
    first of tied maxima) when k == 1 or at temperature 0; so does this, per row.
    """
    scores = cond if uncond is None else cfg_mix(cond, uncond, config.cfg_scale)
    entropy = softmax_entropy(scores)
    greedy = torch.argmax(scores, dim=-1)
    if config.temperature == 0:
        return greedy, entropy
    k = entropy_top_k(entropy, config.k_min, config.k_max)
    drawn = draw(scores, top_k_mask(scores, k, config.k_max), config.temperature, uniforms)
    return torch.where(k == 1, greedy, drawn), entropy
