"""PURE's sampler (docs/pure-format.md §5) in torch, on batched (B, C) logits, on whatever device they live on.

The same maths as ``pure_lite.sampling`` (the NumPy reference), written so a CUDA graph can
capture it: no ``.item()``, no shapes that depend on values, no Python branch on a tensor
(only on the config), randomness only from the ``torch.Generator`` passed in. Per row, k is
a tensor; the top-k threshold is gathered at index k-1 of one ``topk(k_max)``; the draw is a
Gumbel-max race (argmax of logits/T + Gumbel noise from ``torch.rand``), which samples
exactly softmax(logits/T) over the kept ids without a cumulative sum or ``multinomial``.

Entropy and probabilities are computed in float64 where the device has it (float32 on MPS):
the reference's entropy is float32 with NumPy's summation order, so float64 here keeps the
two within ~1e-7 nats, and k (a rounding of a function of the entropy) agrees with it
except within that distance of a rounding boundary. The top-k survivors compare the input
logits themselves, so for equal k they are identical. Nothing here writes into its inputs.

Imported only by torch code: ``import pure_lite`` never loads this module.
"""

from __future__ import annotations

import torch

from .sampling import SamplingConfig


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with a restoration's ``seed``.

    To replay draws inside a captured CUDA graph, register it with the graph
    (``CUDAGraph.register_generator_state``) before capture.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


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


def draw(scores: torch.Tensor, keep: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) ids drawn from softmax(scores / temperature) restricted to ``keep``; temperature > 0.

    Gumbel-max: argmax(z/T + G) with G = -ln(-ln U) is distributed as softmax(z/T). U is
    clamped away from 0, so G is finite and masked ids (-inf) can never win.
    """
    wide = _wide(scores.device)
    z = (scores - scores.amax(dim=-1, keepdim=True)).to(wide) / temperature
    z = z.masked_fill(~keep, float("-inf"))
    u = torch.rand(z.shape, generator=generator, device=z.device, dtype=wide).clamp_min_(torch.finfo(wide).tiny)
    return torch.argmax(z - torch.log(-torch.log(u)), dim=-1)


def _greedy_where_one(scores: torch.Tensor, k: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """The reference takes argmax (the first of tied maxima) when k == 1; so do we, per row."""
    return torch.where(k == 1, torch.argmax(scores, dim=-1), drawn)


def image_codes(
    cond: torch.Tensor, uncond: torch.Tensor | None, config: SamplingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one VQ code per row from (B, codebook) image-subset logits.

    Returns ((B,) int64 codes, (B,) entropies in nats, float64 except on MPS). Without CFG the
    caller passes ``uncond=None``, as to the reference.
    """
    scores = cond if uncond is None else cfg_mix(cond, uncond, config.cfg_scale)
    entropy = softmax_entropy(scores)
    if config.temperature == 0:
        return torch.argmax(scores, dim=-1), entropy
    k = entropy_top_k(entropy, config.k_min, config.k_max)
    drawn = draw(scores, top_k_mask(scores, k, config.k_max), config.temperature, generator)
    return _greedy_where_one(scores, k, drawn), entropy


def text_tokens(
    logits: torch.Tensor, banned: torch.Tensor, config: SamplingConfig, generator: torch.Generator
) -> torch.Tensor:
    """Draw one text token per row from (B, V) logits, never one of the ``banned`` ids (int64, on the
    logits' device); greedy with the default ``text_top_k=1``."""
    scores = logits.index_fill(-1, banned, float("-inf"))
    if config.temperature == 0 or config.text_top_k == 1:
        return torch.argmax(scores, dim=-1)
    k = torch.full(scores.shape[:-1], config.text_top_k, dtype=torch.int64, device=scores.device)
    return draw(scores, top_k_mask(scores, k, config.text_top_k), config.temperature, generator)
