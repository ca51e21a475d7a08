"""What aligning the runtime's cache views costs: unaligned (as before issue 37) against aligned, in one run.

``pure_lite.runtime.engine.SLOT_ALIGN`` makes every cache view a whole number of 64 slots, so a
row's logits do not depend on its batch (docs/decoding.md, "Determinism"). The extra slots are
masked work. PURE-tiny (shipped int8 export, ONNX Runtime, CPU), default sampling, 128-px
tiles from the eval photos: a batch of four tiles, one tile alone, and one tile with SJD
window 16, each timed with SLOT_ALIGN 1 (the unaligned views) and 64, alternating, best of
``--rounds``. Both wall time and the process's CPU time are kept: on a shared machine the CPU
time is the steadier of the two.

    python benchmarks/slot_align.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import report

CASES = (("tile_batch 4", 4, 0), ("tile_batch 1", 1, 0), ("SJD window 16, 1 tile", 1, 16))


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
    results: dict[str, dict[str, float]] = {name: {} for name, _, _ in CASES}
    for _ in range(args.rounds):
        for align in (1, 64):
            engine.SLOT_ALIGN = align
            for name, batch, window in CASES:
                config = SamplingConfig(max_text_tokens=16, jacobi_window=window)
                t0, c0 = time.perf_counter(), time.process_time()
                generate_batch(c.new_decoder(), prompts[:batch], c.layout, c.image_size, config,
                               [np.random.default_rng(i) for i in range(batch)], max_positions=c.max_positions)
                for key, seconds in ((f"wall_{align}", time.perf_counter() - t0), (f"cpu_{align}", time.process_time() - c0)):
                    results[name][key] = min(results[name].get(key, seconds), seconds)
    engine.SLOT_ALIGN = 64
    rows = ["| PURE-tiny, runtime int8 (CPU), 128-px tiles | unaligned views: CPU s (wall s) | aligned (64 slots): CPU s (wall s) "
            "| aligned / unaligned, CPU (wall) |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['cpu_1']:.2f} ({r['wall_1']:.2f}) | {r['cpu_64']:.2f} ({r['wall_64']:.2f}) "
                    f"| {r['cpu_64'] / r['cpu_1']:.2f} ({r['wall_64'] / r['wall_1']:.2f}) |")
    report.write("slot_align", {"pure_tiny": results, "rounds": args.rounds}, "\n".join(rows))


if __name__ == "__main__":
    main()
