"""``pure-lite eval``: restoration quality against plain bicubic upscaling, on degraded HQ images.

Each HQ image is cropped square to ``size``, degraded with the training pipeline at a fixed
seed (image i uses seed + i), restored as ``restore`` does (back to ``size`` in tiles of the
model's own side; ``whole=True``: as one square, PURE's own mode, at most the model's side), and compared with the HQ image beside the bicubic
upscale of the same LQ input. PSNR and SSIM are computed on RGB in [0, 1] (SSIM: 11x11
Gaussian window, sigma 1.5, per channel, averaged). LPIPS (AlexNet, ``pure_lite.lpips``) is
computed when its converted weights are present (``pure-lite convert-lpips``). A metric that
cannot be computed offline (NIQE; LPIPS without weights) is reported as unavailable with the
reason, never as a number. The degradation text is checked against the levels actually applied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .sampling import SamplingConfig

UNAVAILABLE = {
    "lpips": "unavailable: no converted LPIPS weights (run `pure-lite convert-lpips`)",
    "niqe": "unavailable: needs the NIQE natural-scene model, not shipped with pure-lite",
}


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array, 'valid'-free (reflect padding), truncated at ``radius``."""
    t = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, radius, mode="reflect")
    rows = sum(k[i] * p[:, i:i + x.shape[1]] for i in range(len(k)))
    return sum(k[i] * rows[i:i + x.shape[0], :] for i in range(len(k)))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM over channels (Wang et al. 2004 constants K1=0.01, K2=0.03; Gaussian sigma 1.5)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for ch in range(a.shape[2] if a.ndim == 3 else 1):
        x = (a[..., ch] if a.ndim == 3 else a).astype(np.float64)
        y = (b[..., ch] if b.ndim == 3 else b).astype(np.float64)
        mx, my = _gaussian_filter(x), _gaussian_filter(y)
        vx = _gaussian_filter(x * x) - mx * mx
        vy = _gaussian_filter(y * y) - my * my
        cov = _gaussian_filter(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())  # borders excluded, as reference implementations do
    return float(np.mean(values))


METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "bicubic_psnr": "bicubic PSNR",
           "bicubic_ssim": "bicubic SSIM", "bicubic_lpips": "bicubic LPIPS"}


@dataclass
class EvalReport:
    setup: dict = field(default_factory=dict)  # what was measured: model, backend, size, scale, seed
    images: list[dict] = field(default_factory=list)
    mean: dict = field(default_factory=dict)
    unavailable: dict = field(default_factory=lambda: dict(UNAVAILABLE))
    degradation_accuracy: dict = field(default_factory=dict)

    def markdown(self) -> str:
        keys = [k for k in METRICS if k in self.mean]
        rows = ["| image | " + " | ".join(METRICS[k] for k in keys) + " |", "|" + " --- |" * (len(keys) + 1)]
        for r in self.images + [dict(self.mean, name="**mean**")]:
            rows.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.4f}" if "ssim" in k or "lpips" in k else f"{r[k]:.2f}"
                                                       for k in keys) + " |")
        setup = self.setup
        lines = [f"Model: {setup.get('model')} ({setup.get('backend')}); HQ side {setup.get('size')} px, "
                 f"degraded x{setup.get('scale')}, restored {setup.get('restored_as', 'as one square')}, "
                 f"seed {setup.get('seed')} (image i: seed + i).", "",
                 "PSNR/SSIM on RGB in [0, 1]; LPIPS: AlexNet, lower is better.", "", *rows, ""]
        lines += [f"- {k.upper()}: {v}" for k, v in self.unavailable.items()]
        lines += [f"- degradation level correct ({k}): {v:.0%}" for k, v in self.degradation_accuracy.items()]
        return "\n".join(lines) + "\n"


def evaluate(restorer, images: list[Path], *, size: int | None = None, scale: int = 4, seed: int = 0,
             lpips: Callable[[np.ndarray, np.ndarray], float] | None = None,
             progress: Callable | None = None, model: str | None = None,
             sampling: SamplingConfig = SamplingConfig(), whole: bool = False) -> EvalReport:
    """Degrade, restore and score every image at ``size`` (default: the model's own); ``lpips``
    (e.g. ``pure_lite.lpips.LPIPS()``) adds LPIPS. ``model`` names the model in the report;
    ``sampling`` defaults to the reference's. The LQ image is restored back to ``size`` the way
    ``restore`` does it, in tiles of the model's side (one tile when ``size`` is that side), so a
    larger ``size`` measures what a user's larger photo gets; ``whole=True`` restores it as one
    ``size`` square instead (``target_size``: PURE's own mode, refused above the model's side)."""
    from .images import load_image, resize
    from .prompt import parse_degradation_levels
    from .train.data import square_crop
    from .train.degrade import DegradationConfig, degrade

    tile = restorer.components.image_size
    size = size or tile
    report = EvalReport(setup={"model": model or "unnamed", "backend": restorer.components.description,
                               "size": size, "scale": scale, "seed": seed,
                               "restored_as": "as one square" if whole else f"in tiles of {tile} px"})
    if lpips is not None:
        del report.unavailable["lpips"]
    hits: dict[str, list[bool]] = {"noise": [], "blur": [], "jpeg": []}
    for i, path in enumerate(progress(images, desc="evaluating", unit="image") if progress else images):
        hq = square_crop(load_image(path), size)
        degraded = degrade(hq, np.random.default_rng(seed + i), DegradationConfig(scale=scale))
        how = {"target_size": size} if whole else {"scale": size / degraded.lq.shape[1]}  # back to size x size
        result = restorer.restore(degraded.lq, seed=seed + i, sampling=sampling, **how)
        out = np.asarray(result.image, dtype=np.float32) / 255.0
        bicubic = resize(degraded.lq, size)
        said = parse_degradation_levels(result.degradation)
        for kind, level in degraded.levels.items():
            hits[kind].append(said.get(kind) == level)
        report.images.append({"name": path.name, "psnr": psnr(out, hq), "ssim": ssim(out, hq),
                              "bicubic_psnr": psnr(bicubic, hq), "bicubic_ssim": ssim(bicubic, hq),
                              "applied": degraded.levels, "said": said})
        if lpips is not None:
            report.images[-1].update(lpips=lpips(out, hq), bicubic_lpips=lpips(bicubic, hq))
    keys = [k for k in METRICS if k in report.images[0]] if report.images else []
    report.mean = {k: float(np.mean([r[k] for r in report.images])) for k in keys}
    report.degradation_accuracy = {k: float(np.mean(v)) for k, v in hits.items() if v}
    return report


def write_report(report: EvalReport, out: str | os.PathLike) -> tuple[Path, Path]:
    """REPORT.json and REPORT.md (``out`` without suffix, or with either)."""
    base = Path(out).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    data = {**report.setup, "images": report.images, "mean": report.mean, "unavailable": report.unavailable,
            "degradation_accuracy": report.degradation_accuracy, "color_space": "RGB [0, 1]"}
    base.with_suffix(".json").write_text(json.dumps(data, indent=1))
    base.with_suffix(".md").write_text(report.markdown())
    return base.with_suffix(".json"), base.with_suffix(".md")
