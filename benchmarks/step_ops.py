"""Kernels per decode step of the torch backend, by layer implementation, at the 7B model's depth; CPU, one run.

    python benchmarks/step_ops.py

A captured step on a GPU replays one kernel per aten call (views launch none), and at the 7B shape an
H200 spends ~3 ms of an 8.7 ms step on the small ones (docs/gpu.md). This counts the aten calls of one
CFG image step of the chained loop (the body a CUDA graph captures: sampler, token lookup, 32 layers,
image head), for:

- ``transformers``: transformers' Chameleon layers over the grouped cache (``layers="transformers"``);
- ``fused``: ``pure_lite.torch_backend.layers`` over the same weights;
- ``fused + joined``: the same with ``fuse_projections`` (what the torch backend loads);
- ``fused + joined + triton``: the same with ``layers="triton"`` (``pure_lite.torch_backend.fused_kernels``, run here
  through Triton's interpreter; each of its calls is one kernel launch, counted beside the aten calls);

each with the KV cache in the model's dtype and in int8. The counts do not depend on the widths, so the
model is a random Chameleon of the 7B's 32 layers at hidden 64. Beside them, the eager step time on this
CPU at that width: per-call overhead only, a proxy for launch cost, not a GPU figure (``gpu_decode.py``
measures those: its ``graphs-b512``, ``graphs-b512-triton`` and ``graphs-b512-transformers`` variants); none
for the Triton variant, whose interpreter says nothing about a GPU.
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time

import report
import torch
from kernel_count import count_kernels

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.sampling import SamplingConfig
from pure_lite.testing import make_tiny_checkpoint
from pure_lite.tokens import TokenLayout
from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
from pure_lite.torch_backend.decoder import TorchDecoder
from pure_lite.torch_backend.layers import fuse_projections

LAYERS = 32  # PURE's 7B
VARIANTS = {"transformers": ("transformers", False), "fused": ("fused", False), "fused + joined": ("fused", True),
            "fused + joined + triton": ("triton", True)}


def _decoder(folder, layers: str, joined: bool, kv_int8: bool):
    """A decoder after one chained decode, its chain reset: the next ``_link`` is a CFG image step.
    The interpreted Triton variant gets a short prompt and a 2x2 image (the counts do not depend on either)."""
    files = CheckpointFiles.locate(folder)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    lm = load_language_model(files)
    if joined:
        fuse_projections(lm)
    dec = TorchDecoder(lm, ImageHead(lm, layout.image_ids), device_loop=True, attend_bucket=64, layers=layers,
                       kv_cache="int8" if kv_int8 else None)
    side, prompt = (2, 20) if layers == "triton" else (8, 295)
    dec.prefill([list(range(5, 5 + prompt))], 512, 3, unconditional_capacity=128)
    dec.begin_unconditional()
    dec.decode_plain_image(layout.header(64, 64), side, SamplingConfig(), [0], layout.image_ids, layout.row_end)
    with torch.inference_mode():  # a fresh chain on the same buffers, as the next restoration would have
        dec.chain = dec._chain_state(dec.chain_cache.logits, side * side, SamplingConfig(), [0], layout.image_ids,
                                     layout.row_end)
    return dec


def count_calls(dec) -> collections.Counter:
    """Kernels of one CFG image step (``benchmarks/kernel_count.py``), then the cache and chain put back."""
    with torch.inference_mode():
        calls = count_kernels(dec, lambda: dec._link(1, dec._call(1)))
        _same_step_again(dec)
    return calls


def _same_step_again(dec) -> None:
    """Move the cache and the chain back one code, so the next link repeats the same step on the same slots."""
    for group in dec.kv.live_groups:
        group.lengths -= 1
    dec.chain.counter.zero_()


def time_steps(decoders: dict, rounds: int) -> dict:
    """Eager step times in interleaved rounds (one step of each decoder per round), one thread."""
    torch.set_num_threads(1)
    times = {name: [] for name in decoders}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, dec in decoders.items():
                call = dec._call(1)
                start = time.perf_counter()
                dec._link(1, call)
                times[name].append(time.perf_counter() - start)
                _same_step_again(dec)
    return {name: {"cpu_ms_min": 1000 * min(t), "cpu_ms_median": 1000 * statistics.median(t)}
            for name, t in times.items()}


def main() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before pure_lite.torch_backend.fused_kernels is imported
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_checkpoint(tmp, layout="compact", num_layers=LAYERS, hidden_size=64, num_heads=4,
                                      intermediate_size=128)
        decoders = {f"{name}{' / int8 KV' if kv8 else ''}": _decoder(folder, *VARIANTS[name], kv8)
                    for kv8 in (False, True) for name in VARIANTS}
        calls = {name: count_calls(dec) for name, dec in decoders.items()}
        times = time_steps({name: dec for name, dec in decoders.items() if "triton" not in name}, rounds=150)
    results = {name: {"aten_calls": sum(calls[name].values()), "by_op": dict(calls[name].most_common()),
                      **times.get(name, {})} for name in decoders}
    base = results["transformers"]
    rows = ["| layers / KV cache | aten calls per CFG image step (32 layers) | vs transformers | "
            "eager CPU ms per step, width 64, min / median (Python and dispatch overhead only) | min vs transformers |",
            "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        timed = f"{r['cpu_ms_min']:.1f} / {r['cpu_ms_median']:.1f} | {r['cpu_ms_min'] / base['cpu_ms_min']:.2f}" \
            if "cpu_ms_min" in r else "(interpreted) | "
        rows.append(f"| {name} | {r['aten_calls']} | {r['aten_calls'] / base['aten_calls']:.2f} | {timed} |")
    report.write("step_ops", {"layers": LAYERS, "results": results,
                              "note": "aten calls other than views and allocations, counted by a TorchDispatchMode, "
                              "plus Triton kernel launches"}, "\n".join(rows))


if __name__ == "__main__":
    main()
