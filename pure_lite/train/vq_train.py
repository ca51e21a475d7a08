"""Training small VQ-8 image tokenizers (same architecture as LlamaGen's, any width).

Loss = reconstruction ((1 - l2_weight) L1 + l2_weight MSE) + codebook term ||sg(z) - q||^2
+ beta * commitment ||z - sg(q)||^2 (z and q L2-normalised, as the quantizer searches on the
sphere; straight-through gradients; codes left unused for ``restart_every`` steps are re-seeded
from current encoder outputs, which keeps a codebook from collapsing onto a few codes)
+ an optional adversarial term: a small patch discriminator with hinge loss, switched on after
``disc_start`` steps so the autoencoder first learns to reconstruct (PURE-tiny leaves it off: it
made held-out reconstructions worse) + an optional perceptual term, LPIPS-VGG16
(``perceptual.py``), weighted by ``perceptual_weight``.

``decoder_only`` fine-tunes the decoder of a trained tokenizer (``init``) and freezes the rest:
the codes of every image stay what they were, so a language model trained on them keeps working
with the new decoder (``decoder_tune.py``).

The loop (``train_vq_on``) takes a batch sampler, so a folder of photos (``train_vq``, the CLI)
and a training pack (pack_train.py) share it. Batches are drawn from a generator seeded by
(seed, step), so a run resumed from a checkpoint sees the batches an uninterrupted one would.
The result is saved as ``vq_ds8_c2i.pt`` ({"model": state_dict}), the released format.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import VQ_PICKLE_FILE
from ..errors import InvalidImageError, PureLiteError
from ..images import load_image
from ..torch_backend.vq import VQConfig, VQModel
from .config import VQTrainConfig, use_bf16
from .data import IMAGE_SUFFIXES
from .finetune import lr_factor
from .stopping import stop_reason

# (rng, batch size, crop) -> float32 (b, 3, crop, crop) in [-1, 1], or those pixels and the int64
# (b, crop / 8, crop / 8) codes the decoder is to draw them from (decoder_only: decoder_tune --codes)
BatchSampler = Callable[[np.random.Generator, int, int], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


class PatchDiscriminator(nn.Module):
    """Three stride-2 convolutions: a real/fake score per image patch."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 4, 1, 1),
        )

    def forward(self, x):
        return self.net(x)


def vq_losses(vq: VQModel, pixels: torch.Tensor, beta: float, *, l2_weight: float = 0.0, with_latents: bool = False,
              bf16: bool = False, frozen_codes: bool = False, codes: torch.Tensor | None = None):
    """(reconstruction, reconstruction loss, codebook + commitment loss[, latents, codes]), straight-through.

    ``bf16`` runs the encoder and decoder under bf16 autocast; the nearest-code search, the codebook
    and the losses stay fp32 (a code picked from bf16 distances would flip between near ties).
    ``frozen_codes``: no gradient reaches the encoder or codebook, and the codebook term is 0.
    ``codes`` (frozen_codes only): decode these instead of the pixels' own, so the decoder learns to
    draw the pixels from codes something else chose (a language model's samples).
    """
    if codes is not None:
        if not frozen_codes:
            raise ValueError("decoding given codes trains the decoder only (frozen_codes)")
        q = vq.quantize.lookup(codes).detach()
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            recon = vq.decoder(vq.post_quant_conv(q)).float()
        out = (recon, _reconstruction_loss(recon, pixels, l2_weight), recon.new_zeros(()))
        return out + (q, codes) if with_latents else out
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_codes):
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            h = vq.quant_conv(vq.encoder(pixels))
        z = F.normalize(h.float(), dim=1)  # (b, d, h, w)
        codes = vq.quantize.nearest(z)
        q = vq.quantize.lookup(codes)
        vq_loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    if frozen_codes:
        vq_loss = vq_loss.new_zeros(())
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
        recon = vq.decoder(vq.post_quant_conv(z + (q - z).detach()))
    recon = recon.float()
    out = (recon, _reconstruction_loss(recon, pixels, l2_weight), vq_loss)
    return out + (z.detach(), codes) if with_latents else out


def _reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor, l2_weight: float) -> torch.Tensor:
    rec = F.l1_loss(recon, pixels)
    return (1 - l2_weight) * rec + l2_weight * F.mse_loss(recon, pixels) if l2_weight else rec


@torch.no_grad()
def restart_dead_codes(vq: VQModel, used: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> int:
    """Point every unused code at a random current latent vector; returns how many were moved."""
    dead = torch.nonzero(~used).flatten()
    if len(dead):
        pool = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(len(pool), (len(dead),), generator=generator, device="cpu").to(pool.device)
        vq.quantize.embedding.weight[dead] = pool[pick]
    return len(dead)


@torch.no_grad()
def round_trip_psnr(vq: VQModel, images: np.ndarray, *, batch: int = 32) -> np.ndarray:
    """PSNR (dB, RGB in [0, 1]) of encode -> decode for each uint8 (N, S, S, 3) image: the tokenizer's ceiling."""
    device = next(vq.parameters()).device
    was_training = vq.training
    vq.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vq.decode(vq.encode(x))
        mse = (((y - x) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-12)
        out.append((-10 * torch.log10(mse)).cpu().numpy())
    vq.train(was_training)
    return np.concatenate(out)


def _crops(images: list[np.ndarray], rng: np.random.Generator, n: int, crop: int) -> np.ndarray:
    out = np.empty((n, 3, crop, crop), np.float32)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        top = int(rng.integers(img.shape[0] - crop + 1))
        left = int(rng.integers(img.shape[1] - crop + 1))
        patch = img[top:top + crop, left:left + crop]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out[i] = patch.transpose(2, 0, 1) * 2 - 1
    return out


def load_training_images(folder: str | os.PathLike, min_side: int, log: Callable[[str], None]) -> list[np.ndarray]:
    images = []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            img = load_image(path)
        except InvalidImageError as exc:
            log(f"skipping {path}: {exc}")
            continue
        if min(img.shape[:2]) < min_side:
            log(f"skipping {path}: smaller than the {min_side}-pixel crop")
            continue
        images.append(img)
    if not images:
        raise PureLiteError(f"no usable training images in {folder}")
    return images


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_vq_on(
    sample: BatchSampler,
    vq_config: VQConfig,
    config: VQTrainConfig,
    *,
    device: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    deadline: float | None = None,
    log: Callable[[str], None] | None = print,
    init: dict[str, torch.Tensor] | None = None,
    perceptual: nn.Module | None = None,
) -> tuple[VQModel, int]:
    """Train (or resume from ``checkpoint``) for ``config.steps`` steps; returns (model in eval mode, steps done).

    ``checkpoint`` is written every ``config.save_every`` steps and when ``deadline`` (a
    ``time.monotonic()`` value) passes or a stop is requested (``stopping.stop_on_signals``), in
    which case training stops early: call again to go on. ``init``: starting weights (a state dict;
    required by ``config.decoder_only``). ``perceptual``: the loss module for
    ``config.perceptual_weight`` (default: ``PerceptualLoss.load()``, the converted VGG16 weights).
    """
    say = log or (lambda message: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.decoder_only and init is None:
        raise ValueError("decoder_only training needs the tokenizer to start from (init)")
    if config.perceptual_weight and perceptual is None:
        from .perceptual import PerceptualLoss

        perceptual = PerceptualLoss.load()
    if perceptual is not None:
        perceptual = perceptual.to(dev).eval()
    torch.manual_seed(config.seed)
    vq, disc = VQModel(vq_config).to(dev).train(), PatchDiscriminator().to(dev).train()
    if init is not None:
        vq.load_state_dict(init)
    trained = vq.parameters()
    if config.decoder_only:
        vq.requires_grad_(False)
        trained = [*vq.decoder.parameters(), *vq.post_quant_conv.parameters()]
        for p in trained:
            p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=config.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(0.5, 0.9))
    schedule = lambda s: lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    used = torch.zeros(vq_config.codebook_size, dtype=torch.bool, device=dev)
    bf16 = use_bf16(config.precision, dev)
    say(f"vq: training on {dev} in {'bf16 autocast' if bf16 else 'fp32'}")
    step = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        if state["vq_config"] != repr(vq_config):
            raise PureLiteError(f"{ckpt} was made for another VQ config ({state['vq_config']}); use a new folder")
        vq.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        opt.load_state_dict(state["opt"])
        opt_d.load_state_dict(state["opt_d"])
        sched.load_state_dict(state["sched"])
        used.copy_(state["used"])
        step = int(state["step"])
        say(f"vq: resumed from {ckpt} at step {step}")

    def save() -> None:
        if ckpt is not None:
            _save_atomic({"model": vq.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                          "opt_d": opt_d.state_dict(), "sched": sched.state_dict(), "used": used, "step": step,
                          "vq_config": repr(vq_config)}, ckpt)

    started, logged = time.monotonic(), step
    while step < config.steps:
        step += 1
        rng = np.random.default_rng([config.seed, step])
        # contiguous NCHW: a channels-last batch makes the bf16 CPU convolutions ~3x slower (docs/pure-tiny.md)
        batch = sample(rng, config.batch_size, config.crop)
        batch, given = batch if isinstance(batch, tuple) else (batch, None)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(dev, non_blocking=True)
        given = None if given is None else torch.from_numpy(given).to(dev)
        recon, rec, vql, latents, codes = vq_losses(vq, x, config.beta, l2_weight=config.l2_weight, with_latents=True,
                                                    bf16=bf16, frozen_codes=config.decoder_only, codes=given)
        used[codes.flatten()] = True
        loss = rec + vql
        if config.perceptual_weight:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                lpips = perceptual(recon, x).float().mean()
            loss = loss + config.perceptual_weight * lpips
        adversarial = step > config.disc_start and config.disc_weight > 0
        if adversarial:
            loss = loss - config.disc_weight * disc(recon).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        restarts = config.restart_every and not config.decoder_only  # moving a code would change the codes
        if restarts and step % config.restart_every == 0 and step <= config.steps // 2:
            restart_dead_codes(vq, used, latents, torch.Generator().manual_seed(config.seed * 1_000_003 + step))
            used[:] = False
        if adversarial:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if step % config.log_every == 0 or step == config.steps:
            rate = (time.monotonic() - started) / (step - logged)
            extra = f"  lpips {lpips.item():.4f}" if config.perceptual_weight else ""
            say(f"vq step {step}/{config.steps}  rec {rec.item():.4f}  vq {vql.item():.4f}{extra}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {rate:.3f} s/step")
            started, logged = time.monotonic(), step
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            save()
        reason = stop_reason(deadline)
        if reason is not None and step < config.steps:
            save()
            say(f"vq: {reason} at step {step}/{config.steps}; checkpoint saved, run again to go on")
            break
    if step == config.steps and ckpt is not None:
        save()
    return vq.eval(), step


def save_vq(vq: VQModel, out_dir: str | os.PathLike) -> Path:
    """Write ``vq_ds8_c2i.pt`` ({"model": state_dict}, CPU tensors) atomically; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in vq.state_dict().items()}
    _save_atomic({"model": state}, out / VQ_PICKLE_FILE)
    return out / VQ_PICKLE_FILE


def train_vq(image_dir: str | os.PathLike, out_dir: str | os.PathLike, vq_config: VQConfig,
             config: VQTrainConfig = VQTrainConfig(), *, device: str | None = None,
             log: Callable[[str], None] | None = print) -> Path:
    """``pure-lite train-vq``: random crops of the photos in IMAGE_DIR; the tokenizer goes to OUT_DIR."""
    say = log or (lambda message: None)
    images = load_training_images(image_dir, config.crop, say)
    vq, _ = train_vq_on(lambda rng, n, crop: _crops(images, rng, n, crop), vq_config, config,
                        device=device, log=log)
    return save_vq(vq, out_dir)

