"""Which VQ recipe lifts the tokenizer's ceiling: held-out round-trip PSNR after a fixed number of steps.

    python benchmarks/vq_recipe.py TRAIN_PACK HELDOUT_PACK --configs v1 v1-cosine-l2 c4096 wide --steps 600
    python benchmarks/vq_recipe.py TRAIN_PACK HELDOUT_PACK --configs v1-cosine-l2 --precision fp32 bf16

Each named config trains from the same seed on the same batches (64x64 windows of the training
pack's crops), in each ``--precision`` asked for, and is scored on the held-out pack's 128x128 crops (photos never trained on):
mean PSNR of encode -> decode. Results are appended to benchmarks/results/vq_recipe.json with the
seconds per step, so a GPU run's step count can be planned from them. On a 2-core CPU keep each
run under ten minutes: these are directions, not converged numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np

from pure_lite.torch_backend.vq import VQConfig
from pure_lite.train.config import PRECISIONS, VQTrainConfig
from pure_lite.train.pack import hq_batch, load_pack

V1 = dict(base_channels=32, channel_mult=(1, 1, 2, 2), z_channels=32, codebook_size=1024)
NEW = dict(warmup_steps=50, min_lr_ratio=0.1, l2_weight=0.5, lr=1e-3)
CONFIGS: dict[str, tuple[dict, dict]] = {
    "v1": (V1, dict(lr=5e-4)),  # PURE-tiny v1's recipe: constant Adam 5e-4, L1
    "v1-cosine-l2": (V1, NEW),
    "c4096": ({**V1, "codebook_size": 4096}, NEW),
    "wide": (dict(base_channels=32, channel_mult=(1, 2, 2, 4), z_channels=64, codebook_size=4096), NEW),
    "w64": (dict(base_channels=64, channel_mult=(1, 1, 2, 2), z_channels=64, codebook_size=4096), NEW),
}


def run(name: str, train, heldout, steps: int, batch: int, precision: str, log) -> dict:
    import torch

    from pure_lite.train.vq_train import round_trip_psnr, train_vq_on

    vq_kw, train_kw = CONFIGS[name]
    config = VQTrainConfig(steps=steps, batch_size=batch, crop=64, disc_weight=0.0, log_every=25,
                           precision=precision, **{"lr": 5e-4, **train_kw})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.monotonic()
    vq, done = train_vq_on(lambda rng, n, crop: hq_batch(train.hq, rng, n, crop), VQConfig(**vq_kw), config, log=log)
    seconds = time.monotonic() - start
    psnr = round_trip_psnr(vq, heldout.hq)
    return {"config": name, "vq": vq_kw, "train": {k: v for k, v in vars(config).items()}, "steps": done,
            "s_per_step": seconds / max(1, done), "heldout_psnr_db": float(psnr.mean()),
            "heldout_crops": len(heldout), "parameters": sum(p.numel() for p in vq.parameters()),
            "device": str(next(vq.parameters()).device), "date": date.today().isoformat()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train_pack", type=Path)
    ap.add_argument("heldout_pack", type=Path)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                    help="bf16 autocast or fp32 (auto: bf16 where native, pure_lite.train.config.use_bf16)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vq_recipe.json")
    args = ap.parse_args()
    train, heldout = load_pack(args.train_pack), load_pack(args.heldout_pack)
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for name in args.configs:
        for precision in args.precision:
            row = run(name, train, heldout, args.steps, args.batch, precision,
                      log=lambda m: print(f"[{name} {precision}] {m}", flush=True))
            print(json.dumps(row), flush=True)
            results.append(row)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
