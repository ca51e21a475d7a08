"""The torch backend's int8 KV cache (``kv_cache="int8"``) against the cache in the model's dtype, on
PURE-tiny's held-out crops, CPU, in one run.

    python benchmarks/kv_int8.py build/pure-tiny-g4/trained build/pure-tiny   # checkpoint, recipe's build folder

1. fidelity (``pure_tiny.fidelity``): image-token top-1 agreement teacher-forced along the float cache's
   greedy path, and PSNR of each greedy restoration against the float cache's (same inputs);
2. quality (``pure_lite.evaluate``, default sampling, same seeds): PSNR/SSIM/LPIPS and text accuracy;
3. memory: bytes per cached token for PURE's 7B shape, and what a 512² restoration's cache takes.

The speed of the int8 cache on a GPU (it dequantizes the span attention reads) is measured by
``gpu_decode.py`` (``graphs-b512-kv8``, ``full_512`` ``torchao-int4-kv8``), not here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import report
from pure_tiny import _lq_inputs, fidelity

SIZE = 128  # PURE-tiny's output side (a checkpoint folder does not record it; the runtime's manifest does)

LAYERS, HIDDEN, HEADS = 32, 4096, 32  # PURE's 7B shape
SLOTS_512 = 8400 + 4200  # a 512² restoration: conditional rows (prompt + image), unconditional (image)


def memory() -> dict:
    fp16 = 2 * LAYERS * HIDDEN * 2  # keys and values, every layer, 2 bytes a value
    int8 = 2 * LAYERS * (HIDDEN + HEADS * 2)  # one byte a value, one fp16 scale per head
    return {"bytes_per_token": {"fp16": fp16, "int8": int8},
            "gb_512": {"fp16": fp16 * SLOTS_512 / 1e9, "int8": int8 * SLOTS_512 / 1e9}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a trained PURE-tiny checkpoint folder (pack_train's OUT/model)")
    ap.add_argument("build", type=Path, help="the recipe's build folder: its heldout/*.png are scored")
    ap.add_argument("--fidelity-inputs", type=int, default=16)
    args = ap.parse_args()

    from pure_lite import Restorer
    from pure_lite.lpips import LPIPS, default_weights_path

    restorers = {"float": Restorer.from_pretrained(args.checkpoint, backend="torch"),
                 "int8 KV": Restorer.from_pretrained(args.checkpoint, backend="torch", kv_cache="int8")}
    lpips = LPIPS() if default_weights_path().is_file() else None
    from pure_lite.evaluate import evaluate

    inputs = _lq_inputs(args.build, args.fidelity_inputs, SIZE, 4)
    images = sorted((args.build / "heldout").glob("*.png"))
    quality = {}
    for name, restorer in restorers.items():
        r = evaluate(restorer, images, size=SIZE, scale=4, seed=0, lpips=lpips)
        quality[name] = {"mean": r.mean, "degradation_accuracy": r.degradation_accuracy}
    results = {"checkpoint": str(args.checkpoint), "fidelity_inputs": len(inputs),
               "fidelity": fidelity(restorers, inputs, SIZE), "quality": quality, "memory": memory()}
    lines = ["| KV cache | top-1 vs float | greedy restorations identical to float's | greedy PSNR vs float where not "
             "(dB) | PSNR | SSIM | LPIPS | text accuracy "
             "(noise/blur/JPEG) |", "| --- " * 8 + "|"]
    for name in restorers:
        f, q = results["fidelity"][name], results["quality"][name]
        mean, acc = q["mean"], q["degradation_accuracy"]
        lines.append(f"| {name} | {f['top1']:.4f} | {f['identical']}/{len(inputs)} | {f['psnr_vs_float_db']:.2f} | "
                     f"{mean['psnr']:.2f} | "
                     f"{mean['ssim']:.3f} | {mean.get('lpips', float('nan')):.4f} | "
                     + "/".join(f"{acc.get(k, float('nan')):.0%}" for k in ("noise", "blur", "jpeg")) + " |")
    m = results["memory"]
    lines += ["", f"PURE-tiny held out (float32 torch backend, CPU): fidelity over {len(inputs)} crops, quality over "
              f"all. Memory for PURE's 7B shape: {m['bytes_per_token']['fp16'] // 1024} KiB per cached token in "
              f"fp16, {m['bytes_per_token']['int8'] / 1024:.0f} KiB in int8; a 512² restoration's cache "
              f"{m['gb_512']['fp16']:.2f} GB -> {m['gb_512']['int8']:.2f} GB."]
    report.write("kv_int8", results, "\n".join(lines))


if __name__ == "__main__":
    main()
