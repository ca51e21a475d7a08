"""PURE-tiny on its held-out images, in one run: quality, export fidelity, and time per image.

    python benchmarks/pure_tiny.py build/pure-tiny      # the folder examples/train_pure_tiny.py wrote

1. quality: ``pure_lite.evaluate`` (the ``pure-lite eval`` harness) on BUILD/heldout for each
   export, beside bicubic: PSNR/SSIM/LPIPS and the degradation-text level accuracy
2. fidelity against the float export: top-1 agreement of the image-token logits teacher-forced
   along float's greedy path (prompt = each held-out LQ image), and PSNR of each greedy
   restoration against float's (same inputs, temperature 0)
3. time per image, default sampling, fixed seeds: torch backend (the trained checkpoint, float32)
   against the runtime (float / int8 / int4 exports), same inputs, one after the other
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import report

VARIANTS = ("float", "int8", "int4")


def _lq_inputs(build: Path, n: int, size: int, scale: int) -> list[np.ndarray]:
    from pure_lite.images import load_image
    from pure_lite.train.degrade import DegradationConfig, degrade

    paths = sorted((build / "heldout").glob("*.png"))[:n]
    return [degrade(load_image(p), np.random.default_rng(i), DegradationConfig(scale=scale)).lq
            for i, p in enumerate(paths)]


def quality(build: Path, restorers: dict, lpips) -> dict:
    from pure_lite.evaluate import evaluate

    images = sorted((build / "heldout").glob("*.png"))
    out = {}
    for name, restorer in restorers.items():
        r = evaluate(restorer, images, scale=4, seed=0, lpips=lpips)
        out[name] = {"mean": r.mean, "degradation_accuracy": r.degradation_accuracy, "images": r.images}
    return out


def vq_round_trip(build: Path, restorer) -> float:
    """Mean PSNR (dB, RGB [0, 1]) of the held-out HQ crops after a VQ encode/decode round trip: how well
    the decoder draws a crop from its own codes. Up to v4 that bounded every restoration; since v5 the
    decoder is trained on the codes the language model samples instead, so it no longer does."""
    from pure_lite.evaluate import psnr
    from pure_lite.images import from_model_output, load_image, to_model_input

    codec = restorer.components.codec
    values = []
    for path in sorted((build / "heldout").glob("*.png")):
        hq = load_image(path)
        values.append(psnr(from_model_output(codec.decode(codec.encode(to_model_input(hq)))), hq))
    return float(np.mean(values))


def fidelity(restorers: dict, inputs: list[np.ndarray], size: int | None = None) -> dict:
    from pure_lite import SamplingConfig
    from pure_lite.evaluate import psnr

    greedy = SamplingConfig(temperature=0.0)
    agree = {v: [] for v in restorers}
    image_psnr = {v: [] for v in restorers}
    for lq in inputs:
        results = {v: r.restore(lq, sampling=greedy, color_fix=False, target_size=size) for v, r in restorers.items()}
        ref = results["float"]
        for v, r in restorers.items():
            logits = _teacher_forced(r.components.new_decoder(), ref.prompt_tokens, ref.tokens, r.components.layout)
            if v == "float":
                base = logits
            agree[v].append(float((logits.argmax(-1) == base.argmax(-1)).mean()))
            image_psnr[v].append(psnr(np.asarray(results[v].image), np.asarray(ref.image), data_range=255.0))
    # identical restorations score inf: counted apart, so one does not hide the others' PSNR
    return {v: {"top1": float(np.mean(agree[v])), "identical": sum(p == float("inf") for p in image_psnr[v]),
                "psnr_vs_float_db": float(np.mean([p for p in image_psnr[v] if p != float("inf")] or [float("inf")]))}
            for v in agree}


def _teacher_forced(decoder, prompt: np.ndarray, forced: np.ndarray, layout) -> np.ndarray:
    """Image-code logits at every position of ``forced`` that predicts an image token."""
    is_image = np.isin(forced, layout.image_ids)
    decoder.prefill([list(prompt)], len(prompt) + len(forced) + 1, 1)
    rows = []
    for tok, next_is_image in zip(forced, np.append(is_image[1:], False)):
        logits = decoder.step(np.array([[tok]], dtype=np.int64), image=bool(next_is_image))
        if next_is_image:
            rows.append(logits[0].copy())
    return np.stack(rows)


def timing(restorers: dict, inputs: list[np.ndarray], size: int) -> dict:
    out = {}
    for name, r in restorers.items():
        r.restore(inputs[0], seed=0, target_size=size)  # warm-up (allocations, first-run graph optimisation)
        times, steps = [], []
        for i, lq in enumerate(inputs):
            t0 = time.perf_counter()
            res = r.restore(lq, seed=i, target_size=size)
            times.append(time.perf_counter() - t0)
            steps.append(res.timings.get("image_steps_per_s", float("nan")))
        out[name] = {"s_per_image": float(np.mean(times)), "image_steps_per_s": float(np.mean(steps))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("--images", type=int, default=4, help="held-out inputs for fidelity and timing")
    parser.add_argument("--model", type=Path, help="the trained checkpoint timed on the torch backend "
                        "(default: BUILD/model; a model trained elsewhere: the --trained folder)")
    parser.add_argument("--timing-only", action="store_true", help="rerun only the timing (a quiet machine) and "
                        "keep the other results of benchmarks/results/pure_tiny.json")
    args = parser.parse_args()

    from end_to_end import folder_mb

    from pure_lite import Restorer
    from pure_lite.lpips import LPIPS, default_weights_path

    build = args.build
    exports = {v: Restorer.from_pretrained(build / f"export-{v}") for v in VARIANTS}
    size = exports["float"].components.image_size
    lpips = LPIPS() if default_weights_path().is_file() else None
    inputs = _lq_inputs(build, args.images, size, 4)

    torch_model = Restorer.from_pretrained(args.model or build / "model", backend="torch")
    timed = {"torch (float32)": torch_model, **{f"runtime {v}": r for v, r in exports.items()}}
    if args.timing_only:
        results = json.loads((report.ROOT / "benchmarks" / "results" / "pure_tiny.json").read_text())
        results.pop("machine", None)
        results["timing"] = timing(timed, inputs, size)
        report.write("pure_tiny", results, table(results, len(inputs)))
        return
    results = {"build": str(build), "image_size": size,
               "sizes_mb": {v: folder_mb(build / f"export-{v}") for v in VARIANTS}, "lpips": lpips is not None}
    results["vq_reconstruction_psnr_db"] = vq_round_trip(build, exports["float"])
    results["quality"] = quality(build, exports, lpips)
    print({v: r["mean"] | {"degradation_accuracy": r["degradation_accuracy"]} for v, r in results["quality"].items()},
          flush=True)  # the longest part: shown before fidelity and timing
    results["fidelity"] = fidelity(exports, inputs)
    results["timing"] = timing(timed, inputs, size)
    report.write("pure_tiny", results, table(results, len(inputs)))


def table(results: dict, n_inputs: int) -> str:
    size = results["image_size"]
    q, f, t = results["quality"], results["fidelity"], results["timing"]
    first = q["float"]["mean"]
    lp = "lpips" in first
    rows = ["| | export (MB) | PSNR (dB) | SSIM | " + ("LPIPS | " if lp else "") + "noise / blur / JPEG level correct | "
            "image-token top-1 vs float | greedy PSNR vs float (dB) |",
            "| --- " * (8 if lp else 7) + "|"]
    bic = f"| bicubic | – | {first['bicubic_psnr']:.2f} | {first['bicubic_ssim']:.4f} | " + \
          (f"{first['bicubic_lpips']:.4f} | " if lp else "") + "– | – | – |"
    rows.append(bic)
    for v in VARIANTS:
        m, acc = q[v]["mean"], q[v]["degradation_accuracy"]
        ps = f[v]["psnr_vs_float_db"]
        rows.append(f"| PURE-tiny {v} | {results['sizes_mb'][v]:.1f} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
                    + (f"{m['lpips']:.4f} | " if lp else "")
                    + f"{acc['noise']:.0%} / {acc['blur']:.0%} / {acc['jpeg']:.0%} | {f[v]['top1']:.3f} | "
                    + ("identical" if ps == float("inf") else f"{ps:.1f}") + " |")
    trows = ["| backend | s / image | image steps / s |", "| --- | --- | --- |"]
    trows += [f"| {k} | {v['s_per_image']:.2f} | {v['image_steps_per_s']:.0f} |" for k, v in t.items()]
    n_eval = len(q["float"]["images"])
    trows.append("")
    trows.append(f"VQ round trip of the held-out HQ crops (each crop's own codes through the decoder): "
                 f"{results['vq_reconstruction_psnr_db']:.2f} dB PSNR.")
    table = (f"PURE-tiny, {size}x{size} from {size // 4}x{size // 4}, on its {n_eval} held-out crops (photos never "
             "seen in training), degraded with the training pipeline at seeds 0..n-1. PSNR/SSIM on RGB [0, 1], "
             "LPIPS AlexNet (lower is better). Fidelity and timing on the first "
             f"{n_inputs} held-out inputs.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(trows))
    return table


if __name__ == "__main__":
    main()
