"""The image codes a model samples for a training pack's LQ crops: what its decoder is actually given.

    python -m pure_lite.train.sampled_codes MODEL PACK OUT [--limit N] [--batch 32]

The tokenizer's decoder is trained on the codes the encoder gives a clean crop, but at restoration
time it draws the codes the language model sampled from the LQ crop, and a small language model
gets many of them wrong. Pairing each HQ crop with the codes MODEL samples for one of its LQ
versions (default sampling, as ``pure-lite restore`` does it: the same prompt, tile and sampler)
lets ``decoder_tune --codes`` train the decoder on what it will see.

Crops are visited in a fixed random order, so a run stopped early (or ``--limit``) holds a uniform
subset of the pack. Crop i uses LQ version ``i % K`` and draws from ``default_rng([seed, i])``.
OUT (``.npz``: ``index``, ``version``, ``codes``, ``meta``) is rewritten atomically after every
batch, and a run that finds it goes on from where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import PureLiteError
from .pack import load_pack
from .stopping import run_resumable, stop_reason

FORMAT = 1


def visit_order(n: int, seed: int) -> np.ndarray:
    """The crops' fixed visiting order: any prefix is a uniform sample of the pack."""
    return np.random.default_rng([seed, n]).permutation(n)


def lq_prompts(components, lq: np.ndarray, size: int) -> list[np.ndarray]:
    """Prompt ids for uint8 (n, s, s, 3) LQ crops restored as one size x size tile each: what
    ``Restorer.restore`` builds when the model's tile is the crop's size (PURE-tiny: 128)."""
    from ..restorer import tile_prompt
    from ..tiles import TilePlan, input_region

    plan = TilePlan.cover(size, size, size)
    return [tile_prompt(components, input_region(x.astype(np.float32) / 255.0, plan, plan.boxes[0])) for x in lq]


def _load(out: Path, seed: int, model: str) -> tuple[list[int], list[int], list[np.ndarray]]:
    if not out.is_file():
        return [], [], []
    with np.load(out) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT or meta.get("seed") != seed or meta.get("model") != model:
            raise PureLiteError(f"{out} was sampled with other settings ({meta}); use a new file name")
        return f["index"].tolist(), f["version"].tolist(), list(f["codes"])


def sample_pack_codes(model: str | Path, pack_path: str | Path, out: str | Path, *, limit: int | None = None,
                      batch: int = 32, seed: int = 0, minutes: float | None = None, log=print) -> Path | None:
    """Sample MODEL's codes for PACK's crops into OUT; returns OUT once ``limit`` crops (default: all) are done,
    None when stopped early (run again to go on)."""
    from ..generate import generate_batch
    from ..restorer import Restorer
    from ..sampling import SamplingConfig

    say = log or (lambda message: None)
    out = Path(out)
    pack = load_pack(pack_path, max_bytes=sys.maxsize)  # a local pack: the carry limit does not apply
    want = len(pack) if limit is None else min(limit, len(pack))
    index, version, codes = _load(out, seed, str(model))
    if len(index) >= want:
        return out
    components = Restorer.from_pretrained(model).components
    order = visit_order(len(pack), seed)
    versions = pack.lq.shape[1]
    deadline = time.monotonic() + 60 * minutes if minutes else None
    started = time.monotonic()
    while len(index) < want:
        chunk = order[len(index):min(want, len(index) + batch)]
        ks = [int(i) % versions for i in chunk]
        prompts = lq_prompts(components, np.stack([pack.lq[i, k] for i, k in zip(chunk, ks)]), pack.size)
        gens = generate_batch(components.new_decoder(), prompts, components.layout, pack.size, SamplingConfig(),
                              [np.random.default_rng([seed, int(i)]) for i in chunk],
                              max_positions=components.max_positions)
        index += [int(i) for i in chunk]
        version += ks
        codes += [g.codes.astype(np.int16) for g in gens]
        meta = {"format": FORMAT, "seed": seed, "model": str(model), "pack": str(pack_path), "sampling": "default"}
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, index=np.array(index, np.int32), version=np.array(version, np.int8),
                         codes=np.stack(codes), meta=np.array(json.dumps(meta)))
        rate = (time.monotonic() - started) / max(1, len(index))
        say(f"sampled codes: {len(index)}/{want} crops ({rate:.2f} s per crop this run)")
        reason = stop_reason(deadline)
        if reason is not None and len(index) < want:
            say(f"sampled codes: {reason}; run again to go on")
            return None
    return out


def load_sampled_codes(path: str | Path, pack_len: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(crop index (n,), codes (n, side/8, side/8)) from a ``sample_pack_codes`` file, checked against a
    pack of ``pack_len`` crops of ``side`` pixels."""
    with np.load(path) as f:
        index, codes = f["index"].astype(np.int64), f["codes"].astype(np.int64)
    if len(index) == 0 or index.max() >= pack_len or len(np.unique(index)) != len(index):
        raise PureLiteError(f"{path} does not index this pack's {pack_len} crops")
    if codes.shape[1:] != (side // 8, side // 8):
        raise PureLiteError(f"{path} holds {codes.shape[1:]} codes per crop, not those of {side}-pixel crops")
    return index, codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="the model whose sampled codes to record (an export is fastest on CPU)")
    ap.add_argument("pack", type=Path, help="training pack: its LQ crops are restored")
    ap.add_argument("out", type=Path, help=".npz to write (resumes when present)")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many crops (default: all)")
    ap.add_argument("--batch", type=int, default=32, help="restorations decoded together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    args = ap.parse_args(argv)
    return run_resumable(lambda: sample_pack_codes(args.model, args.pack, args.out, limit=args.limit,
                                                   batch=args.batch, seed=args.seed, minutes=args.minutes),
                         "stopped before the last crop")


if __name__ == "__main__":
    sys.exit(main())
