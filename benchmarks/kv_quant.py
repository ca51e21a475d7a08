"""The torch backend's quantized KV caches (``kv_cache="int8"`` and ``"int4"``) against the cache in the model's
dtype, side by side in one run, CPU.

    python benchmarks/pure_tiny_checkpoint.py build/pure-tiny-torch     # PURE-tiny as a torch checkpoint
    python benchmarks/kv_quant.py build/pure-tiny-torch                 # scikit-image's sample photos
    python benchmarks/kv_quant.py CHECKPOINT --build build/pure-tiny    # or a recipe's build/heldout/*.png

1. fidelity (``pure_tiny.fidelity``): image-token top-1 agreement teacher-forced along the float cache's
   greedy path, and PSNR of each greedy restoration against the float cache's (same inputs); int4 twice: as
   shipped, and with two of PURE-tiny's rows exact instead of 136 slots (the 7B's geometry, ``SCALED_WINDOW``);
2. quality (``pure_lite.evaluate``, default sampling, same seeds): PSNR/SSIM/LPIPS and text accuracy;
3. memory: bytes per cached token for PURE's 7B shape, and what a 512² restoration's cache takes.

Without ``--build`` the held-out images are 128² crops of the RGB photos scikit-image ships (none of them in
PURE-tiny's training data), degraded as the recipe degrades its held-out crops. The speed of a quantized cache
on a GPU (it dequantizes the span attention reads) is ``gpu_decode.py``'s to measure, not this script's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import report
from pure_tiny import _lq_inputs, fidelity

SIZE = 128  # PURE-tiny's output side
KINDS = {"float": None, "int8 KV": "int8", "int4 KV": "int4", "int4 KV, window 34": "int4"}
# PURE-tiny's tile is 16 codes wide, so the int4 cache's 136 exact slots (two rows of the 7B's 64-wide tile)
# cover half its image block: "window 34" keeps two of PURE-tiny's rows exact instead, the 7B's geometry
SCALED_WINDOW = 34
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")

LAYERS, HIDDEN, HEADS = 32, 4096, 32  # PURE's 7B shape
HEAD_DIM = HIDDEN // HEADS
SLOTS_512 = 8400 + 4200  # a 512² restoration: conditional rows (prompt + image), unconditional (image)
PROMPT_512 = 4200  # of which the prompt (the LQ image's 64 x 65 codes and the text)


def memory() -> dict:
    """Bytes per cached token (keys and values, every layer; int4: a slot after the prompt) and a 512²
    restoration's cache (one tile, its two groups; int4's int8 prompt and window of exact slots included),
    2-byte model dtype: ``kv_cache.kv_bytes``, the layouts of ``kv_cache._Group``."""
    import torch

    from pure_lite.torch_backend.kv_cache import kv_bytes

    layouts = {"fp16": None, "int8": "int8", "int4": "int4"}
    huge = 10**6  # slots: a per-token figure the window and the per-row counters do not move
    per_token = {k: round(kv_bytes(LAYERS, HEADS, HEAD_DIM, [(1, huge)], torch.bfloat16, kind) / huge)
                 for k, kind in layouts.items()}
    groups = [(1, SLOTS_512 - 4200, PROMPT_512), (1, 4200)]
    return {"bytes_per_token": per_token,
            "gb_512": {k: kv_bytes(LAYERS, HEADS, HEAD_DIM, groups, torch.bfloat16, kind) / 1e9
                       for k, kind in layouts.items()}}


def keep_exact(restorer, slots: int) -> None:
    """Make ``restorer``'s int4 cache keep ``slots`` newest slots exact: the window is read when a prefill
    allocates the cache, so its decoder's prefill runs with ``kv_cache.KV_FLOAT_WINDOW`` set to ``slots``."""
    from pure_lite.torch_backend import kv_cache

    decoder = restorer.components.new_decoder()  # the one decoder this restorer uses (shares_decoder)
    prefill = decoder.prefill

    def windowed(*args, **kwargs):
        saved, kv_cache.KV_FLOAT_WINDOW = kv_cache.KV_FLOAT_WINDOW, slots
        try:
            return prefill(*args, **kwargs)
        finally:
            kv_cache.KV_FLOAT_WINDOW = saved

    decoder.prefill = windowed


def sample_photo_crops(out: Path) -> Path:
    """OUT/heldout/*.png: the center square of each of scikit-image's PHOTOS, resized to SIZE²."""
    from PIL import Image
    from skimage import data

    folder = out / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        pixels = getattr(data, name)()
        image = Image.fromarray(pixels[0] if isinstance(pixels, tuple) else pixels).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS).save(folder / f"{name}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a PURE-tiny checkpoint folder (pure_tiny_checkpoint.py's, or "
                                                  "pack_train's OUT/model)")
    ap.add_argument("--build", type=Path, help="a recipe's build folder: its heldout/*.png are scored (default: "
                                               "crops of scikit-image's sample photos)")
    ap.add_argument("--fidelity-inputs", type=int, default=8)
    ap.add_argument("--quality-images", type=int, default=None, help="score only the first N (default: all)")
    args = ap.parse_args()

    from pure_lite import Restorer
    from pure_lite.evaluate import evaluate
    from pure_lite.lpips import LPIPS, default_weights_path

    build = args.build or sample_photo_crops(Path(tempfile.mkdtemp(prefix="kv_quant_")))
    restorers = {name: Restorer.from_pretrained(args.checkpoint, backend="torch", kv_cache=kind)
                 for name, kind in KINDS.items()}
    keep_exact(restorers["int4 KV, window 34"], SCALED_WINDOW)
    lpips = LPIPS() if default_weights_path().is_file() else None
    inputs = _lq_inputs(build, args.fidelity_inputs, SIZE, 4)
    images = sorted((build / "heldout").glob("*.png"))[:args.quality_images]
    agreement = fidelity(restorers, inputs, SIZE)
    print({name: f["top1"] for name, f in agreement.items()}, flush=True)
    quality = {}
    for name, restorer in restorers.items():
        r = evaluate(restorer, images, size=SIZE, scale=4, seed=0, lpips=lpips)
        quality[name] = {"mean": r.mean, "degradation_accuracy": r.degradation_accuracy}
    results = {"checkpoint": str(args.checkpoint), "images": [p.name for p in images],
               "held_out": str(args.build) if args.build else "scikit-image sample photos, center crops",
               "fidelity_inputs": len(inputs), "fidelity": agreement, "quality": quality, "memory": memory()}
    lines = ["| KV cache | top-1 vs float | greedy restorations identical to float's | greedy PSNR vs float where not "
             "(dB) | PSNR | SSIM | LPIPS | text accuracy (noise/blur/JPEG) | KiB per token, 7B |",
             "| --- " * 9 + "|"]
    m = results["memory"]
    for name in restorers:
        f, q = results["fidelity"][name], results["quality"][name]
        mean, acc = q["mean"], q["degradation_accuracy"]
        kib = m["bytes_per_token"]["fp16" if KINDS[name] is None else KINDS[name]] / 1024
        lines.append(f"| {name} | {f['top1']:.4f} | {f['identical']}/{len(inputs)} | {f['psnr_vs_float_db']:.2f} | "
                     f"{mean['psnr']:.2f} | {mean['ssim']:.3f} | {mean.get('lpips', float('nan')):.4f} | "
                     + "/".join(f"{acc.get(k, float('nan')):.0%}" for k in ("noise", "blur", "jpeg"))
                     + f" | {kib:.0f} |")
    lines += ["", f"{args.checkpoint} (float32 torch backend, CPU) on {results['held_out']}: fidelity over "
              f"{len(inputs)} crops, quality over {len(images)}, sampled with seed 0. A 512² restoration of PURE's 7B "
              f"shape caches {m['gb_512']['fp16']:.2f} GB in fp16, {m['gb_512']['int8']:.2f} GB in int8, "
              f"{m['gb_512']['int4']:.2f} GB in int4 (computed)."]
    report.write("kv_quant", results, "\n".join(lines))


if __name__ == "__main__":
    main()
