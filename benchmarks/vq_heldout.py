"""The tokenizer's ceiling for PURE-tiny v2: round-trip PSNR of the held-out pack's 128x128 crops.

    python benchmarks/vq_heldout.py build/pure-tiny/v2/work/vq.ckpt build/pure-tiny/pack/heldout.npz
    python benchmarks/vq_heldout.py build/pure-tiny/v2/work/vq/vq_ds8_c2i.pt build/pure-tiny/pack/heldout.npz

Scores a tokenizer of the v2 recipe's architecture (``PackTrainConfig().vq_config()``), either a
training checkpoint (``vq.ckpt``, which knows its step: run it between sittings to see where the
VQ stands) or the finished ``vq_ds8_c2i.pt``. Issue 15 asks for >= 22 dB on crops of photos the
tokenizer never saw. Each run appends a row to benchmarks/results/vq_heldout.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizer", type=Path, help="vq.ckpt (a training checkpoint) or vq_ds8_c2i.pt")
    ap.add_argument("heldout_pack", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vq_heldout.json")
    args = ap.parse_args()

    import torch

    from pure_lite.torch_backend.vq import VQModel
    from pure_lite.train.pack import load_pack
    from pure_lite.train.pack_train import PackTrainConfig
    from pure_lite.train.vq_train import round_trip_psnr

    state = torch.load(args.tokenizer, map_location="cpu", weights_only=True)
    vq = VQModel(PackTrainConfig().vq_config())
    vq.load_state_dict(state["model"])
    psnr = round_trip_psnr(vq.eval(), load_pack(args.heldout_pack).hq)
    row = {"tokenizer": args.tokenizer.name, "step": int(state["step"]) if "step" in state else None,
           "heldout_psnr_db": round(float(psnr.mean()), 2), "heldout_crops": len(psnr), "machine": report.machine()}
    print(json.dumps(row))
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(results + [row], indent=1))


if __name__ == "__main__":
    main()
