"""Tiles decoded one at a time against tiles decoded together, in one run.

1. PURE-tiny (the shipped int8 export, ONNX Runtime on the CPU), default sampling: a 160x120
   crop of a 640x480 photo (scikit-image's "coffee", resized) restored at x4 through
   ``Restorer.restore`` with ``tile_batch`` 1, 4 and 8: tiles per second, and the time the
   whole 640x480 photo at x4 (540 tiles of 128 px) would take at that rate.
2. The mid-size random Chameleon of benchmarks/end_to_end.py (hidden 1024, 8 layers, int8
   export): image steps per second over 128-px tiles decoded in batches of 1, 4 and 8.

    python benchmarks/tiles.py [--skip-mid] [--workdir /tmp/pure-lite-bench]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

import report

BATCHES = (1, 4, 8)


def photo() -> np.ndarray:
    from skimage import data

    from pure_lite import images

    return images.resize(data.coffee().astype(np.float32) / 255, 640, 480)


def pure_tiny(rounds: int) -> dict:
    from pure_lite import Restorer
    from pure_lite.tiles import TilePlan

    restorer = Restorer.from_pretrained()
    crop = photo()[:120, :160]
    full_tiles = len(TilePlan.cover(640 * 4, 480 * 4, restorer.components.image_size).boxes)
    restorer.restore(crop[:32, :32], seed=0)  # warm-up: first-run graph optimisation
    out = {"full_photo_tiles": full_tiles}
    for batch in BATCHES:
        best = None
        for _ in range(rounds):
            t0 = time.perf_counter()
            res = restorer.restore(crop, seed=0, tile_batch=batch)
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
        tiles = len(res.tiles)
        out[str(batch)] = {"tiles": tiles, "seconds": best, "tiles_per_s": tiles / best,
                           "photo_seconds": full_tiles / (tiles / best)}
    return out


def mid_size(workdir: Path, tiles: int) -> dict:
    from pure_lite import Restorer, SamplingConfig
    from pure_lite.export import export_onnx
    from pure_lite.generate import generate_batch
    from pure_lite.prompt import prompt_ids
    from pure_lite.testing import make_tiny_checkpoint

    ckpt, export = workdir / "mid", workdir / "mid-onnx-int8"
    if not (ckpt / "config.json").exists():
        make_tiny_checkpoint(ckpt, seed=0, layout="pure", hidden_size=1024, num_layers=8, num_heads=16,
                             intermediate_size=2816, vq_base_channels=32)
    if not export.exists():
        export_onnx(ckpt, export, quantization="int8", progress=None)
    c = Restorer.from_pretrained(export).components
    rng = np.random.default_rng(0)
    size = 128
    prompts = [prompt_ids(c.tokenizer, c.layout, c.layout.encode_image(
        c.codec.encode(rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)))) for _ in range(max(BATCHES))]
    config = SamplingConfig(max_text_tokens=16)
    out = {"tile": size, "codes_per_tile": (size // 8) ** 2}
    for batch in BATCHES:
        t0 = time.perf_counter()
        gens = generate_batch(c.new_decoder(), prompts[:batch], c.layout, size, config,
                              [np.random.default_rng(i) for i in range(batch)], max_positions=c.max_positions)
        seconds = time.perf_counter() - t0
        image_s = gens[0].timings["image_s"]
        out[str(batch)] = {"seconds": seconds, "image_steps_per_s": batch * out["codes_per_tile"] / image_s,
                           "tiles_per_s": batch / seconds}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="PURE-tiny: best of this many runs per batch")
    parser.add_argument("--skip-mid", action="store_true")
    parser.add_argument("--workdir", default="/tmp/pure-lite-bench")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    tiny = pure_tiny(args.rounds)
    rows = ["| PURE-tiny, 640x480 photo at x4 (crop: 35 tiles) | tiles / s | vs one at a time | whole photo (540 tiles) |",
            "| --- | --- | --- | --- |"]
    for batch in BATCHES:
        r = tiny[str(batch)]
        rows.append(f"| tile_batch {batch} | {r['tiles_per_s']:.2f} | {r['tiles_per_s'] / tiny['1']['tiles_per_s']:.2f}x "
                    f"| {r['photo_seconds']:.0f} s |")
    results = {"pure_tiny": tiny}
    if not args.skip_mid:
        mid = mid_size(Path(args.workdir), max(BATCHES))
        results["mid_size_int8"] = mid
        rows += ["", "| mid-size int8 (hidden 1024, 8 layers), 128-px tiles | image steps / s | vs batch 1 |",
                 "| --- | --- | --- |"]
        for batch in BATCHES:
            r = mid[str(batch)]
            rows.append(f"| batch {batch} | {r['image_steps_per_s']:.1f} | "
                        f"{r['image_steps_per_s'] / mid['1']['image_steps_per_s']:.2f}x |")
    report.write("tiles", results, "\n".join(rows))


if __name__ == "__main__":
    main()
