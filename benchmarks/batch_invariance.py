"""What the runtime's batch invariance costs: the engine as before issue 37 against today's, in one run.

Two measures make a row's logits independent of its batch (docs/decoding.md, "Determinism"):
``engine.SLOT_ALIGN`` makes every cache view a whole number of 64 slots (the extra slots are
masked work), and ``engine.even_rows`` gives every quantized matmul an even number of rows (a
spare row where a call would have an odd number). PURE-tiny (shipped int8 export, ONNX
Runtime, CPU), default sampling, 128-px tiles from the eval photos: a batch of four tiles, one
tile alone, one tile with SJD window 16, and one tile without CFG (``cfg_scale=1``: a lone
tile's every step then has one row, so today's engine adds a spare row to each). Each is timed
in three arms, alternating, best of ``--rounds``: neither measure ("before"), aligned views only,
and both (today's engine). Both wall time and the process's CPU time are kept: on a shared
machine the CPU time is the steadier.

    python benchmarks/batch_invariance.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import report

# (name, tiles, SJD window, CFG scale; 0.8 is PURE's)
CASES = (("tile_batch 4", 4, 0, 0.8), ("tile_batch 1", 1, 0, 0.8), ("SJD window 16, 1 tile", 1, 16, 0.8),
         ("tile_batch 1, CFG off", 1, 0, 1.0))
ARMS = ("before", "aligned", "aligned + even rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    from jacobi import held_out_inputs

    from pure_lite import Restorer, SamplingConfig, images
    from pure_lite.generate import generate_batch
    from pure_lite.restorer import tile_prompt
    from pure_lite.runtime import engine

    tiny = Restorer.from_pretrained()
    c = tiny.components
    inputs = held_out_inputs(c.image_size)
    side = c.image_size
    tiles = [images.resize(lq, side, side) for lq in inputs]
    prompts = [tile_prompt(c, t) for t in (tiles + [t[:, ::-1] for t in tiles])[:4]]
    results: dict[str, dict[str, float]] = {name: {} for name, *_ in CASES}
    even_rows = engine.even_rows
    for _ in range(args.rounds):
        for arm in ARMS:
            engine.SLOT_ALIGN = 1 if arm == "before" else 64
            engine.even_rows = even_rows if arm.endswith("even rows") else (lambda rows: rows)
            for name, batch, window, cfg in CASES:
                config = SamplingConfig(max_text_tokens=16, jacobi_window=window, cfg_scale=cfg)
                t0, c0 = time.perf_counter(), time.process_time()
                generate_batch(c.new_decoder(), prompts[:batch], c.layout, c.image_size, config,
                               [np.random.default_rng(i) for i in range(batch)], max_positions=c.max_positions)
                for key, seconds in ((f"wall {arm}", time.perf_counter() - t0), (f"cpu {arm}", time.process_time() - c0)):
                    results[name][key] = min(results[name].get(key, seconds), seconds)
    engine.SLOT_ALIGN, engine.even_rows = 64, even_rows
    rows = ["| PURE-tiny, runtime int8 (CPU), 128-px tiles | " + " | ".join(f"{arm}: CPU s (wall s)" for arm in ARMS)
            + " | today / before, CPU (wall) |", "| --- " * (len(ARMS) + 2) + "|"]
    for name, r in results.items():
        cells = [f"{r['cpu ' + arm]:.2f} ({r['wall ' + arm]:.2f})" for arm in ARMS]
        ratio = f"{r['cpu ' + ARMS[-1]] / r['cpu before']:.2f} ({r['wall ' + ARMS[-1]] / r['wall before']:.2f})"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    report.write("batch_invariance", {"pure_tiny": results, "rounds": args.rounds}, "\n".join(rows))


if __name__ == "__main__":
    main()
