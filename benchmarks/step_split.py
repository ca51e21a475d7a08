"""Where a PURE-tiny decode step's time goes: host (Python/NumPy) vs the decoder run vs the head run.

One 128-px tile of a held-out photo (shipped int8 export, ONNX Runtime on the CPU, default
sampling), decoded by ``generate_batch`` as B copies at once (B = 1, 4, 8) and with SJD
(window 8, B = 1). The decoder's sessions are wrapped with timers:

- decoder run: ``run_with_iobinding`` of the decoder graph (and the prompt's ``run``);
- head run: the image head (text head while writing) session;
- engine host: the rest of ``OnnxDecoder.step`` (mask, bindings, KV write, cache re-layout);
- loop host: everything else (the decode loop, the sampler, prefill bookkeeping).

A second pass with ONNX Runtime's profiler splits the decoder's kernel time into attention
(the MatMuls against the cache), the quantized weight MatMuls (MatMulNBits) and the rest.

    python benchmarks/step_split.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import report

CASES = ((1, 0), (4, 0), (8, 0), (1, 8))


class _Timed:
    """A session proxy adding the time of its runs to ``totals[key]``."""

    def __init__(self, session, totals: dict, key: str):
        self.session, self.totals, self.key = session, totals, key

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.totals[self.key] += time.perf_counter() - t0
        return out

    def run(self, *args, **kwargs):
        return self._timed(self.session.run, *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed(self.session.run_with_iobinding, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _setup():
    from pure_lite import Restorer
    from pure_lite.restorer import tile_prompt
    from jacobi import held_out_inputs

    c = Restorer.from_pretrained().components
    lq = held_out_inputs(c.image_size)[0]
    prompt = tile_prompt(c, lq)
    return c, prompt


def _decode(c, decoder, prompt, batch: int, window: int):
    from pure_lite import SamplingConfig
    from pure_lite.generate import generate_batch

    return generate_batch(decoder, [prompt] * batch, c.layout, c.image_size, SamplingConfig(jacobi_window=window),
                          [np.random.default_rng(i) for i in range(batch)], max_positions=c.max_positions)


def host_split(c, prompt, batch: int, window: int) -> dict:
    totals = collections.defaultdict(float)
    decoder = c.new_decoder()
    decoder.session = _Timed(decoder.session, totals, "decoder")
    for attr in ("image_head", "text_head"):
        session, name, width = getattr(decoder, attr)
        setattr(decoder, attr, (_Timed(session, totals, "head"), name, width))
    step = decoder.step

    def timed_step(*args, **kwargs):
        before = totals["decoder"], totals["head"]
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        totals["step"] += time.perf_counter() - t0
        totals["decoder_in_step"] += totals["decoder"] - before[0]
        totals["head_in_step"] += totals["head"] - before[1]
        return out

    decoder.step = timed_step
    t0 = time.perf_counter()
    gens = _decode(c, decoder, prompt, batch, window)
    total = time.perf_counter() - t0
    # the prompt's decoder and head runs happen in prefill, outside step: they count as runs, not loop host
    outside = (totals["decoder"] - totals["decoder_in_step"]) + (totals["head"] - totals["head_in_step"])
    return {"seconds": total, "per_tile": total / batch, "decoder": totals["decoder"], "head": totals["head"],
            "engine_host": totals["step"] - totals["decoder_in_step"] - totals["head_in_step"],
            "loop_host": total - totals["step"] - outside, "calls": gens[0].timings["batch_calls"]}


def kernel_split(c, batch: int, window: int, prompt) -> dict:
    """Decoder kernel time by kind, from ONNX Runtime's profiler (one profiled run)."""
    import onnxruntime as ort

    from pure_lite.manifest import Manifest
    from pure_lite.restorer import DEFAULT_MODEL
    from pure_lite.runtime.engine import OnnxDecoder

    manifest = Manifest.load(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        def session(graph: str, profile: bool):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if profile:
                options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / graph)
            return ort.InferenceSession(str(manifest.path(graph)), options, providers=["CPUExecutionProvider"])

        sessions = {"decoder": session("decoder", True), "lm_head": session("lm_head", False),
                    "image_head": session("image_head", False)}
        _decode(c, OnnxDecoder(sessions, manifest, "cpu"), prompt, batch, window)
        events = json.loads(Path(sessions["decoder"].end_profiling()).read_text())
    kinds = collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op, shapes = event["args"].get("op_name"), event["args"].get("input_type_shape", [])
        # attention: a MatMul whose second input is the cache ((rows, heads, slots, head_dim), slots > T)
        cache_like = (op in ("MatMul", "FusedMatMul") and len(shapes) == 2
                      and len(next(iter(shapes[1].values()))) == 4 and next(iter(shapes[1].values()))[2] > 64)
        kinds["attention" if cache_like else "weights" if op == "MatMulNBits" else "other"] += event["dur"]
    total = sum(kinds.values())
    return {k: v / total for k, v in kinds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per case")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    c, prompt = _setup()
    _decode(c, c.new_decoder(), prompt, 1, 0)  # warm-up
    results = {}
    for batch, window in CASES:
        runs = [host_split(c, prompt, batch, window) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        best["kernels"] = kernel_split(c, batch, window, prompt)
        results[f"B{batch}_W{window}"] = best
    rows = ["| PURE-tiny tile, int8, CPU | s / tile | decoder run | head run | engine host | loop + sampler host "
            "| decoder kernels: attention / weight MatMuls / other |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for batch, window in CASES:
        r = results[f"B{batch}_W{window}"]
        k = r["kernels"]
        name = f"batch {batch}" + (f", SJD window {window}" if window else "")
        share = {key: 100 * r[key] / r["seconds"] for key in ("decoder", "head", "engine_host", "loop_host")}
        rows.append(f"| {name} | {r['per_tile']:.2f} | {share['decoder']:.0f}% | {share['head']:.0f}% "
                    f"| {share['engine_host']:.0f}% | {share['loop_host']:.0f}% "
                    f"| {100 * k.get('attention', 0):.0f}% / {100 * k.get('weights', 0):.0f}% / {100 * k.get('other', 0):.0f}% |")
    report.write("step_split", {"pure_tiny": results}, "\n".join(rows))


if __name__ == "__main__":
    main()
