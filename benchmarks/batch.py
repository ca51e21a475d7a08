"""restore-many's throughput against a plain loop, side by side in one run, on PURE-tiny (CPU).

    python benchmarks/batch.py [--images 24] [--rounds 2]

1. make N 32x32 inputs: 128x128 crops of scikit-image's bundled photos, downscaled 4x (bicubic)
2. Ray is started once first and timed on its own: it is paid once per run, not per image
3. each round runs, one after the other on the same inputs: the plain loop (one process: load
   ``Restorer.from_pretrained()`` once, then ``restore`` and an atomic PNG save per image, with the
   same per-image seeds as restore-many), then ``restore_many`` with 1 worker and with 2 workers
   into fresh output folders; each variant's time runs from loading the model to the last output
   written (for restore-many: planning, starting the workers, which load the model, and the run)
4. the median over rounds per variant; images/min with and without Ray's start; and, since this
   machine's load drifts between variants, a measure within each variant: the share of its time
   spent outside the restorations themselves (the sum of the per-image restore times, taken in
   the loop and by the workers alike), which is what Ray's dispatch, transfers and worker start add
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import report

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat")


def make_inputs(folder: Path, n: int) -> list[Path]:
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        y, x = rng.integers(0, photo.shape[0] - 128), rng.integers(0, photo.shape[1] - 128)
        crop = Image.fromarray(photo[y:y + 128, x:x + 128]).convert("RGB").resize((32, 32), Image.BICUBIC)
        paths.append(folder / f"photo{i:03d}.png")
        crop.save(paths[-1])
    return paths


def plain_loop(inputs: list[Path], out: Path) -> tuple[float, float]:
    """(wall seconds, seconds inside the restorations)."""
    from pure_lite import Restorer
    from pure_lite.batch import image_seed
    from pure_lite.images import save_image_atomic

    t0 = time.perf_counter()
    restorer = Restorer.from_pretrained()
    inside = 0.0
    for path in inputs:
        t = time.perf_counter()
        result = restorer.restore(path, seed=image_seed(0, path.name))
        inside += time.perf_counter() - t
        save_image_atomic(result.image, out / f"{path.stem}_restored.png")
    return time.perf_counter() - t0, inside


def ray_run(folder: Path, out: Path, workers: int) -> tuple[float, float]:
    """(wall seconds, seconds inside the restorations, summed over workers)."""
    from pure_lite.batch import BatchConfig, restore_many

    t0 = time.perf_counter()
    r = restore_many(folder, out, config=BatchConfig(workers=workers), progress=False)
    assert r.count("done") == len(r.entries), r.summary()
    return time.perf_counter() - t0, sum(e.seconds for e in r.entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        inputs = make_inputs(tmp / "in", args.images)
        t0 = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        rounds = []
        for r in range(args.rounds):
            times = {"loop": plain_loop(inputs, tmp / f"loop{r}")}
            for w in (1, 2):
                times[f"ray-{w}"] = ray_run(tmp / "in", tmp / f"ray{w}-{r}", w)
            rounds.append({k: {"seconds": wall, "restore_seconds": inside} for k, (wall, inside) in times.items()})
            print(f"round {r}: " + ", ".join(f"{k} {wall:.1f} s ({inside:.1f} s restoring)"
                                             for k, (wall, inside) in times.items()))
        ray.shutdown()

    n = args.images
    median = {k: statistics.median(t[k]["seconds"] for t in rounds) for k in rounds[0]}
    # Outside the restorations: 1 - restoring / (wall x workers), per round, then the median.
    outside = {k: statistics.median(1 - t[k]["restore_seconds"] / (t[k]["seconds"] * (2 if k == "ray-2" else 1))
                                    for t in rounds) for k in rounds[0]}
    variants = {k: {"seconds": s, "images_per_min": 60 * n / s,
                    "images_per_min_with_ray_start": 60 * n / (s + (ray_start if k != "loop" else 0.0)),
                    "vs_loop": median["loop"] / s, "share_outside_restore": outside[k]} for k, s in median.items()}
    results = {"images": n, "input_side": 32, "output_side": 128, "rounds": rounds, "ray_start_s": ray_start,
               "cpus": os.cpu_count(), "variants": variants}
    names = {"loop": "plain loop, one process (`Restorer.restore`)", "ray-1": "restore-many, 1 worker",
             "ray-2": "restore-many, 2 workers"}
    rows = ["| variant | s for the folder (median) | images / min | throughput vs loop | "
            "images / min counting Ray's start | time outside the restorations |", "| --- | --- | --- | --- | --- | --- |"]
    for k, v in variants.items():
        rows.append(f"| {names[k]} | {v['seconds']:.1f} | {v['images_per_min']:.1f} | {v['vs_loop']:.2f}x | "
                    f"{v['images_per_min_with_ray_start']:.1f} | {v['share_outside_restore']:.1%} |")
    table = (f"PURE-tiny (the shipped int8 export, ONNX Runtime on CPU), a folder of {n} inputs of 32x32 -> 128x128, "
             f"median of {args.rounds} rounds run one after the other in one process. Each time includes loading "
             f"the model (restore-many: starting its workers). Starting Ray itself took {ray_start:.1f} s, once per "
             "run. Time outside the restorations: the share of each variant's worker time (wall x workers) not "
             "spent inside a restoration (loading the model, reading, PNG encoding and writing, and for "
             "restore-many its dispatch and transfers), median over rounds.\n\n" + "\n".join(rows))
    report.write("batch", results, table)


if __name__ == "__main__":
    main()
