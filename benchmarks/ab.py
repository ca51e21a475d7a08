"""Two source trees (a baseline and a candidate) decoding the same PURE-tiny tiles, side by side.

On a shared machine the load changes from minute to minute, so the trees take turns: each
round runs the workload once in the baseline's Python, then once in the candidate's, and
the table reports medians over rounds and the candidate's speed-up in each round. The
workload (``--worker``): 8 tiles of a 640x480 photo at x4 (PURE-tiny, shipped int8 export,
default sampling, tile i with seed i), decoded (1) one at a time, (2) in one batch of 8,
(3) one at a time with SJD window 8. Each case also reports a hash of the tiles' tokens, so
a change that should not alter any draw can be checked to alter none.

    python benchmarks/ab.py /path/to/baseline /path/to/candidate [--rounds 3]

Each tree is run with its own ``.venv/bin/python`` from its root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import report

TILES = 8
CASES = {"batch 1": (1, 0), "batch 8": (8, 0), "batch 1, SJD window 8": (1, 8)}


def worker() -> None:
    """Run the workload in this interpreter (whichever pure_lite it imports); print JSON."""
    warnings.simplefilter("ignore", RuntimeWarning)
    from skimage import data

    from pure_lite import Restorer, SamplingConfig, images
    from pure_lite.generate import generate_batch
    from pure_lite.restorer import tile_prompt
    from pure_lite.tiles import TilePlan, input_region

    c = Restorer.from_pretrained().components
    photo = images.resize(data.coffee().astype(np.float32) / 255, 640, 480)
    plan = TilePlan.cover(640 * 4, 480 * 4, c.image_size)
    boxes = plan.boxes[:: len(plan.boxes) // TILES][:TILES]
    prompts = [tile_prompt(c, input_region(photo, plan, box)) for box in boxes]

    def decode(batch: int, window: int) -> list:
        config, out = SamplingConfig(jacobi_window=window), []
        for first in range(0, TILES, batch):
            out += generate_batch(c.new_decoder(), prompts[first:first + batch], c.layout, c.image_size, config,
                                  [np.random.default_rng(i) for i in range(first, first + batch)],
                                  max_positions=c.max_positions)
        return out

    decode(1, 0)  # warm-up
    results = {}
    for name, (batch, window) in CASES.items():
        t0 = time.perf_counter()
        gens = decode(batch, window)
        seconds = time.perf_counter() - t0
        digest = hashlib.sha256(b"".join(g.tokens.tobytes() for g in gens)).hexdigest()[:12]
        results[name] = {"seconds": seconds, "tiles_per_s": TILES / seconds, "tokens": digest,
                         "calls": float(np.mean([g.timings["decoder_calls"] for g in gens]))}
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", nargs="?")
    parser.add_argument("candidate", nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    trees = {"baseline": Path(args.baseline).resolve(), "candidate": Path(args.candidate).resolve()}
    runs = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            command = [str(tree / ".venv" / "bin" / "python"), str(Path(__file__).resolve()), "--worker"]
            out = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in runs[name][-1].items()),
                  file=sys.stderr)
    lines = ["| 8 PURE-tiny tiles (int8, CPU) | baseline tiles / s | candidate tiles / s | candidate speed-up "
             "(median; per round) | tokens identical |", "| --- | --- | --- | --- | --- |"]
    for case in CASES:
        base = [r[case]["tiles_per_s"] for r in runs["baseline"]]
        cand = [r[case]["tiles_per_s"] for r in runs["candidate"]]
        ratios = [c / b for b, c in zip(base, cand)]
        same = {r[case]["tokens"] for r in runs["baseline"] + runs["candidate"]}
        lines.append(f"| {case} | {np.median(base):.2f} | {np.median(cand):.2f} | {np.median(ratios):.2f}x "
                     f"({', '.join(f'{r:.2f}' for r in ratios)}) | {'yes' if len(same) == 1 else 'no'} |")
    for name in trees:
        med = {case: np.median([r[case]["tiles_per_s"] for r in runs[name]]) for case in CASES}
        lines.append("")
        lines.append(f"{name}: batch 8 vs batch 1 {med['batch 8'] / med['batch 1']:.2f}x; "
                     f"SJD window 8 vs plain {med['batch 1, SJD window 8'] / med['batch 1']:.2f}x "
                     f"({runs[name][0]['batch 1']['calls']:.0f} vs {runs[name][0]['batch 1, SJD window 8']['calls']:.0f} "
                     "calls per tile)")
    commits = {name: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                                    text=True).stdout.strip() for name, tree in trees.items()}
    lines.insert(0, f"Baseline {commits['baseline']}, candidate {commits['candidate']} (plus uncommitted changes, if any); "
                    f"{args.rounds} rounds, the trees taking turns.\n")
    report.write("ab", {"commits": commits, "runs": runs}, "\n".join(lines))


if __name__ == "__main__":
    main()
