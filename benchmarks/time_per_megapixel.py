"""How long will it take: PURE-tiny's restoration time per tile and per output megapixel, on this CPU.

A restoration's cost is its number of tiles (the model's 128-px squares over the output,
overlapping by a quarter: tiles.py), so the rule of thumb is seconds per tile, and tiles per
output megapixel. Measured: the README's example photo (96x64) and a 160x120 crop of
scikit-image's "coffee" (resized to 640x480 first), each restored once at x4 with the defaults
(``tile_batch`` 4, seed 0) through ``Restorer.restore`` after a warm-up. The table's larger
photos are extrapolated from the measured seconds per tile and their exact tile counts, and
say so. The machine's load average is recorded beside the numbers: on a shared machine they
move a lot between runs, so the table also gives the rate of the same crop, model and tile batch
measured on a quiet machine by benchmarks/tiles.py (benchmarks/results/tiles.json).

    python benchmarks/time_per_megapixel.py [--from-json]   # --from-json: only rebuild the table
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

import report

ROOT = Path(__file__).resolve().parents[1]
EXTRAPOLATED = ((320, 240), (640, 480), (1024, 768))  # input sizes at x4, from the measured rate
SCALE = 4


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    from pure_lite import images

    coffee = images.resize(data.coffee().astype(np.float32) / 255, 640, 480)
    return {"examples/images/photo.png (96x64)": images.load_image(ROOT / "examples" / "images" / "photo.png"),
            "coffee crop (160x120)": coffee[:120, :160]}


def measure() -> dict:
    from pure_lite import Restorer
    from pure_lite.tiles import TilePlan

    restorer = Restorer.from_pretrained()
    side = restorer.components.image_size
    restorer.restore(np.full((32, 32, 3), 0.5, np.float32), seed=0)  # warm-up: first-run graph optimisation
    rows = []
    for name, pixels in photos().items():
        h, w = pixels.shape[:2]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = restorer.restore(pixels, seed=0, scale=SCALE)
        seconds = time.perf_counter() - t0
        out_mpx = result.image.width * result.image.height / 1e6
        rows.append({"photo": name, "input": [w, h], "output": [result.image.width, result.image.height],
                     "tiles": len(result.tiles), "seconds": seconds, "seconds_per_tile": seconds / len(result.tiles),
                     "seconds_per_output_mpx": seconds / out_mpx, "load_average_1min": load})
    per_tile = sum(r["seconds"] for r in rows) / sum(r["tiles"] for r in rows)
    extrapolated = []
    for w, h in EXTRAPOLATED:
        tiles = len(TilePlan.cover(w * SCALE, h * SCALE, side).boxes)
        extrapolated.append({"input": [w, h], "output": [w * SCALE, h * SCALE], "tiles": tiles,
                             "seconds": tiles * per_tile})
    return {"model": "PURE-tiny (shipped int8 export, ONNX Runtime CPU)", "tile": side, "scale": SCALE,
            "tile_batch": 4, "measured": rows, "seconds_per_tile": per_tile,
            "tiles_per_output_mpx": sum(r["tiles"] for r in rows) / sum(r["output"][0] * r["output"][1] / 1e6
                                                                        for r in rows),
            "extrapolated": extrapolated}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def quiet_rate() -> dict:
    """Seconds per tile of the same crop at tile_batch 4, from the tiles benchmark's last (quiet) run."""
    tiles = json.loads((ROOT / "benchmarks" / "results" / "tiles.json").read_text())
    return {"seconds_per_tile": 1 / tiles["pure_tiny"]["4"]["tiles_per_s"], "date": tiles["machine"]["date"],
            "source": "benchmarks/results/tiles.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", action="store_true", help="rebuild the table from the saved results")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    saved = ROOT / "benchmarks" / "results" / "time_per_megapixel.json"
    results = json.loads(saved.read_text()) if args.from_json else measure()
    results.pop("machine", None)
    results["quiet"] = quiet = quiet_rate()
    loads = [r["load_average_1min"] for r in results["measured"]]
    rows = [f"| input (x4) | output | tiles | quiet machine ({quiet['date']}) | this run (load {min(loads):.0f}-"
            f"{max(loads):.0f} on {os.cpu_count()} cores) |", "| --- | --- | --- | --- | --- |"]
    for r in results["measured"] + results["extrapolated"]:
        measured = "seconds_per_tile" in r
        rows.append(f"| {r['input'][0]}x{r['input'][1]} | {r['output'][0]}x{r['output'][1]} | {r['tiles']} | "
                    f"~{_duration(r['tiles'] * quiet['seconds_per_tile'])} | "
                    f"{_duration(r['seconds'])}{'' if measured else ' (extrapolated)'} |")
    per_mpx = results["tiles_per_output_mpx"]
    rows += ["", f"Rule of thumb: {per_mpx:.0f} tiles per output megapixel; {quiet['seconds_per_tile']:.2f} s per "
                 f"tile on a quiet machine (~{quiet['seconds_per_tile'] * per_mpx / 60:.0f} min per output "
                 f"megapixel), {results['seconds_per_tile']:.1f} s per tile in this run."]
    report.write("time_per_megapixel", results, "\n".join(rows))


if __name__ == "__main__":
    main()
