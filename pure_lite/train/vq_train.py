"""Training small VQ-8 image tokenizers (same architecture as LlamaGen's, any width).

Loss = L1 reconstruction + codebook term ||sg(z) - q||^2 + beta * commitment ||z - sg(q)||^2
(z and q L2-normalised, as the quantizer searches on the sphere; straight-through gradients;
codes left unused for ``restart_every`` steps are re-seeded from current encoder outputs, which
keeps a small codebook from collapsing onto a few codes)
+ an adversarial term: a small patch discriminator with hinge loss, switched on after
``disc_start`` steps so the autoencoder first learns to reconstruct. We chose the adversarial
term over a perceptual one because a perceptual network's weights cannot be downloaded here.
The result is saved as ``vq_ds8_c2i.pt`` ({"model": state_dict}), the released format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import VQ_PICKLE_FILE
from ..errors import InvalidImageError, PureLiteError
from ..images import load_image
from ..vq import VQConfig, VQModel
from .config import VQTrainConfig
from .data import IMAGE_SUFFIXES


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


def vq_losses(vq: VQModel, pixels: torch.Tensor, beta: float, *, with_latents: bool = False):
    """(reconstruction, L1 loss, codebook + commitment loss[, latents, codes]), straight-through quantization."""
    z = F.normalize(vq.quant_conv(vq.encoder(pixels)), dim=1)  # (b, d, h, w)
    codes = vq.quantize.nearest(z)
    q = vq.quantize.lookup(codes)
    vq_loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    recon = vq.decoder(vq.post_quant_conv(z + (q - z).detach()))
    out = (recon, F.l1_loss(recon, pixels), vq_loss)
    return out + (z.detach(), codes) if with_latents else out


@torch.no_grad()
def restart_dead_codes(vq: VQModel, used: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> int:
    """Point every unused code at a random current latent vector; returns how many were moved."""
    dead = torch.nonzero(~used).flatten()
    if len(dead):
        pool = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(len(pool), (len(dead),), generator=generator)
        vq.quantize.embedding.weight[dead] = pool[pick]
    return len(dead)


def _crops(images: list[np.ndarray], rng: np.random.Generator, n: int, crop: int) -> torch.Tensor:
    out = np.empty((n, 3, crop, crop), np.float32)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        top = int(rng.integers(img.shape[0] - crop + 1))
        left = int(rng.integers(img.shape[1] - crop + 1))
        patch = img[top:top + crop, left:left + crop]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out[i] = patch.transpose(2, 0, 1) * 2 - 1
    return torch.from_numpy(out)


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


def train_vq(image_dir: str | os.PathLike, out_dir: str | os.PathLike, vq_config: VQConfig,
             config: VQTrainConfig = VQTrainConfig(), *, log: Callable[[str], None] | None = print) -> Path:
    say = log or (lambda message: None)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    images = load_training_images(image_dir, config.crop, say)
    vq, disc = VQModel(vq_config).train(), PatchDiscriminator().train()
    opt = torch.optim.Adam(vq.parameters(), lr=config.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(0.5, 0.9))
    used = torch.zeros(vq_config.codebook_size, dtype=torch.bool)
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(1, config.steps + 1):
        x = _crops(images, rng, config.batch_size, config.crop)
        recon, rec, vql, latents, codes = vq_losses(vq, x, config.beta, with_latents=True)
        used[codes.flatten()] = True
        loss = rec + vql
        adversarial = step > config.disc_start and config.disc_weight > 0
        if adversarial:
            loss = loss - config.disc_weight * disc(recon).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if config.restart_every and step % config.restart_every == 0 and step <= config.steps // 2:
            restart_dead_codes(vq, used, latents, generator)
            used[:] = False
        if adversarial:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if step % config.log_every == 0 or step == config.steps:
            say(f"vq step {step}/{config.steps}  l1 {rec.item():.4f}  vq {vql.item():.4f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (VQ_PICKLE_FILE + ".tmp")
    torch.save({"model": vq.eval().state_dict()}, tmp)
    os.replace(tmp, out / VQ_PICKLE_FILE)
    return out / VQ_PICKLE_FILE
