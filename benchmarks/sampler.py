"""Sampler time per image step at vocabulary 73728, batch 1 with CFG: pure-lite's NumPy sampler vs a
torch version of the reference's logits-processor chain (CFG over the full vocabulary, a structure
mask built with ``isin``, softmax entropy, top-k, temperature, ``multinomial``).

    python benchmarks/sampler.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pure_lite.sampling import NumpySampler, SamplingConfig
from pure_lite.tokens import TokenLayout, image_token_name

import report

V = 73728


def released_layout() -> TokenLayout:
    vocab = {"<s>": 0, "<eoss>": 8196, "<racm3:break>": 8197, "<reserved08799>": 8803, "<reserved08706>": 8710}
    vocab.update({image_token_name(c): 4 + c for c in range(8192)})
    vocab.update({image_token_name(8192 + c): 65536 + c for c in range(8192)})
    return TokenLayout.from_vocab(vocab, V)


def reference_step(torch, cond, uncond, image_ids, cfg: SamplingConfig, generator):
    """One step of the reference chain, on full-vocabulary torch tensors."""
    scores = cfg.cfg_scale * (cond - uncond) + uncond
    allowed = torch.isin(torch.arange(scores.shape[-1]), image_ids)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
    k = int(torch.round(cfg.k_min + (cfg.k_max - cfg.k_min) * torch.sigmoid(entropy.clamp(0, 10) - 5)).item())
    threshold = torch.topk(scores, k).values[..., -1:]
    scores = scores.masked_fill(scores < threshold, float("-inf")) / cfg.temperature
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)


def timed(fn, steps: int) -> float:
    for _ in range(min(100, steps)):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    layout, cfg = released_layout(), SamplingConfig()
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, V)) * 2).astype(np.float32)
    sampler = NumpySampler()

    def ours():
        rows = layout.image_logits(logits)
        return sampler.image_code(rows[0], rows[1], cfg, rng)

    results = {"vocab": V, "steps": args.steps, "pure_lite_numpy_ms": 1e3 * timed(ours, args.steps)}
    try:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        t_cond, t_uncond = torch.from_numpy(logits[0:1]), torch.from_numpy(logits[1:2])
        image_ids = torch.from_numpy(np.array(layout.image_ids))
        gen = torch.Generator().manual_seed(0)
        results["reference_torch_ms"] = 1e3 * timed(
            lambda: reference_step(torch, t_cond, t_uncond, image_ids, cfg, gen), args.steps)
        results["speedup"] = results["reference_torch_ms"] / results["pure_lite_numpy_ms"]
    except ImportError:
        results["reference_torch_ms"] = None
    ref = results["reference_torch_ms"]
    table = "\n".join([
        "| sampler (vocab 73728, CFG, one image step) | ms / step |",
        "| --- | --- |",
        f"| reference chain (torch: CFG, isin mask, entropy, top-k, temperature, multinomial) | {ref:.3f} |" if ref else "| reference chain | (torch not installed) |",
        f"| pure-lite NumPy sampler (image-token subset) | {results['pure_lite_numpy_ms']:.3f} |",
    ])
    if ref:
        table += f"\n\nSpeed-up: {results['speedup']:.1f}x. Target: at most 0.2 ms per step."
    report.write("sampler", results, table)


if __name__ == "__main__":
    main()
