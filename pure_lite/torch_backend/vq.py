"""The LlamaGen VQ-8 image tokenizer (docs/pure-format.md §4) in torch.

Parameter names and shapes match the released ``vq_ds8_c2i.pt`` exactly at the default
widths; narrower tokenizers (used in tests and small models) are the same graph with
fewer channels, and ``VQConfig.from_state_dict`` reads their widths off the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError


@dataclass(frozen=True)
class VQConfig:
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    encoder_blocks: int = 2  # residual blocks per encoder level
    decoder_blocks: int = 3  # residual blocks per decoder level
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    usage_buffer: int = 65536  # size of the (unused) ``quantize.codebook_used`` buffer
    norm_groups: int = 32

    def __post_init__(self) -> None:
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width must be a multiple of {self.norm_groups} (GroupNorm), got {widths}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "VQConfig":
        """Infer the widths of a checkpoint from its tensor shapes."""
        try:
            base = sd["encoder.conv_in.weight"].shape[0]
            levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
            mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base for i in range(levels))

            def count(prefix: str) -> int:
                return 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))

            emb = sd["quantize.embedding.weight"]
            return cls(
                base_channels=base,
                channel_mult=mult,
                encoder_blocks=count("encoder.conv_blocks.0.res."),
                decoder_blocks=count("decoder.conv_blocks.0.res."),
                z_channels=sd["encoder.conv_out.weight"].shape[0],
                codebook_size=emb.shape[0],
                codebook_dim=emb.shape[1],
                usage_buffer=sd["quantize.codebook_used"].shape[0] if "quantize.codebook_used" in sd else 65536,
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise CheckpointError(f"VQ state dict does not have the VQ-8 layout: {exc}") from exc


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        k = self.k(n).reshape(b, c, h * w)  # (b, c, hw)
        v = self.v(n).reshape(b, c, h * w)  # (b, c, hw)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (no padding inside the conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, optional attention after each, optional resampling."""

    def __init__(self, cin: int, cout: int, blocks: int, attn: bool, resample: type[nn.Module] | None, groups: int):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks))
        if attn:
            self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(blocks))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if hasattr(self, "attn"):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups), AttnBlock(channels, groups), ResnetBlock(channels, channels, groups)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        g, last = cfg.norm_groups, len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.base_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(widths[i - 1] if i else cfg.base_channels, widths[i], cfg.encoder_blocks, i == last,
                  Downsample if i != last else None, g)
            for i in range(len(widths))
        )
        self.mid = _mid(widths[-1], g)
        self.norm_out = _norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        g, last = cfg.norm_groups, len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], g)
        self.conv_blocks = nn.ModuleList(
            Level(widths[i - 1] if i else widths[0], widths[i], cfg.decoder_blocks, i == 0,
                  Upsample if i != last else None, g)
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by cosine similarity: inputs and codes are L2-normalised before the search."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        self.register_buffer("codebook_used", torch.zeros(cfg.usage_buffer))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(b, d, h, w) latents to (b, h, w) code indices."""
        flat = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (b, h, w, d)
        return torch.argmax(flat @ self.codebook().t(), dim=-1)  # max cosine = min L2 on the sphere

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h, w) codes to (b, d, h, w) normalised code vectors."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """Encode images to h x w codes and decode codes to images (pixels in [-1, 1])."""

    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] to (b, H/8, W/8) int64 codes."""
        return self.quantize.nearest(self.quant_conv(self.encoder(pixels)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h, w) codes to (b, 3, 8h, 8w) pixels clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes))).clamp(-1, 1)
