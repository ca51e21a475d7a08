"""Plain decoding against speculative Jacobi decoding (SJD), side by side in one run.

1. PURE-tiny (shipped int8 export, ONNX Runtime, CPU), default sampling: decoder calls and
   seconds per 128-px tile for windows 0 (plain), 8, 16 and 32, over the degraded held-out
   photos of ``pure-lite eval`` (scikit-image's chelsea and coffee) and several seeds.
2. Quality: ``pure_lite.evaluate`` (PSNR/SSIM, LPIPS when its weights are converted) of plain
   against the chosen window over the same photos and seeds; the spread across seeds is the
   run-to-run spread the two must agree within.
3. The mid-size random Chameleon of benchmarks/end_to_end.py (hidden 1024, 8 layers) on the
   torch backend and its int8 export: calls and seconds for one 128-px tile, plain vs windows 8, 16.

    python benchmarks/jacobi.py [--seeds 3] [--skip-mid] [--workdir /tmp/pure-lite-bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np

import report

WINDOWS = (0, 8, 16, 32)


def held_out_inputs(size: int) -> list[np.ndarray]:
    """The eval photos, cropped to the tile and degraded with the training pipeline (x4)."""
    from pure_lite.cli import _default_eval_images
    from pure_lite.images import load_image
    from pure_lite.train.data import square_crop
    from pure_lite.train.degrade import DegradationConfig, degrade

    return [degrade(square_crop(load_image(p), size), np.random.default_rng(i), DegradationConfig(scale=4)).lq
            for i, p in enumerate(_default_eval_images())]


def speed(restorer, inputs, windows, seeds: int, max_text_tokens: int | None = None) -> dict:
    from pure_lite import SamplingConfig

    out = {}
    extra = {} if max_text_tokens is None else {"max_text_tokens": max_text_tokens}
    for window in windows:
        config = SamplingConfig(jacobi_window=window, **extra)
        calls, seconds, image_s = [], [], []
        for seed in range(seeds):
            for lq in inputs:
                t0 = time.perf_counter()
                res = restorer.restore(lq, seed=seed, sampling=config)
                seconds.append(time.perf_counter() - t0)
                calls.append(res.timings["decoder_calls"])
                image_s.append(res.timings["image_s"])
        out[str(window)] = {"calls": float(np.mean(calls)), "seconds": float(np.mean(seconds)),
                            "image_seconds": float(np.mean(image_s)), "runs": len(calls)}
    return out


def quality(restorer, window: int, seeds: int) -> dict:
    from pure_lite import SamplingConfig
    from pure_lite.cli import _default_eval_images
    from pure_lite.evaluate import evaluate

    lpips = None
    try:
        from pure_lite.lpips import LPIPS

        lpips = LPIPS()
    except Exception:  # weights not converted here: PSNR/SSIM only
        pass
    out = {}
    for w in (0, window):
        runs = [evaluate(restorer, _default_eval_images(), seed=10 * s, lpips=lpips,
                         sampling=SamplingConfig(jacobi_window=w)).mean for s in range(seeds)]
        out[str(w)] = {k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs]))}
                       for k in runs[0] if not k.startswith("bicubic")}
    return out


def mid_size(workdir: Path, seeds: int) -> dict:
    from pure_lite import Restorer
    from pure_lite.export import export_onnx
    from pure_lite.testing import make_tiny_checkpoint

    ckpt, export = workdir / "mid", workdir / "mid-onnx-int8"
    if not (ckpt / "config.json").exists():
        make_tiny_checkpoint(ckpt, seed=0, layout="pure", hidden_size=1024, num_layers=8, num_heads=16,
                             intermediate_size=2816, vq_base_channels=32)
    if not export.exists():
        export_onnx(ckpt, export, quantization="int8", progress=None)
    lq = [(np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)]
    out = {}
    for name, path in (("torch", ckpt), ("onnx-int8", export)):
        r = Restorer.from_pretrained(path)
        r = Restorer(dataclasses.replace(r.components, image_size=128))  # 128-px tiles: 256 codes
        out[name] = speed(r, lq, (0, 8, 16), seeds, max_text_tokens=16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=16, help="the window compared for quality")
    parser.add_argument("--skip-mid", action="store_true")
    parser.add_argument("--workdir", default="/tmp/pure-lite-bench")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    from pure_lite import Restorer

    tiny = Restorer.from_pretrained()
    inputs = held_out_inputs(tiny.components.image_size)
    tiny.restore(inputs[0], seed=0)  # warm-up
    results = {"pure_tiny": speed(tiny, inputs, WINDOWS, args.seeds)}
    results["quality"] = quality(tiny, args.window, args.seeds)
    if not args.skip_mid:
        results["mid_size"] = mid_size(Path(args.workdir), 1)

    def rows(title: str, r: dict) -> list[str]:
        base = r["0"]
        lines = [f"| {title} | decoder calls / tile | fewer calls | s / tile | faster |", "| --- | --- | --- | --- | --- |"]
        for w, v in r.items():
            lines.append(f"| {'plain' if w == '0' else f'SJD window {w}'} | {v['calls']:.0f} | "
                         f"{base['calls'] / v['calls']:.2f}x | {v['seconds']:.2f} | {base['seconds'] / v['seconds']:.2f}x |")
        return lines

    table = rows("PURE-tiny, runtime int8 (CPU)", results["pure_tiny"])
    q = results["quality"]
    keys = list(q["0"])
    table += ["", "| PURE-tiny quality (mean ± std over seeds) | " + " | ".join(keys) + " |",
              "| --- |" + " --- |" * len(keys)]
    for w, v in q.items():
        table.append(f"| {'plain' if w == '0' else f'SJD window {w}'} | "
                     + " | ".join(f"{v[k]['mean']:.3f} ± {v[k]['std']:.3f}" for k in keys) + " |")
    for name, r in results.get("mid_size", {}).items():
        table += [""] + rows(f"mid-size, {name} (CPU), 128-px tile", r)
    report.write("jacobi", results, "\n".join(table))


if __name__ == "__main__":
    main()
