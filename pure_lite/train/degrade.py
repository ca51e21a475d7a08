"""A second-order real-world degradation pipeline (the Real-ESRGAN recipe, written from its paper).

    stage 1: blur -> random resize -> noise -> JPEG
    stage 2: blur (p=0.8) -> random resize -> noise -> JPEG
    final:   [resize to LQ size + sinc (p=0.8)] and JPEG, in random order

Everything is drawn from one ``numpy.random.Generator``, so a seed fixes the LQ image and
the parameters, which are returned with per-type strengths in [0, 1] (blur, noise, JPEG)
and their small / medium / large levels, the labels PURE learns to write.
Images are float32 H x W x 3 in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import MissingDependencyError

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
LEVELS = ("small", "medium", "large")
DEGRADATION_TYPES = ("noise", "blur", "jpeg")


@dataclass(frozen=True)
class StageConfig:
    """Probabilities and ranges of one stage (defaults: the published first stage)."""

    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 30.0)  # in 8-bit levels
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 95)


SECOND_STAGE = StageConfig(blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
                           noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5))


@dataclass(frozen=True)
class DegradationConfig:
    """The whole pipeline. Each ``*_enabled`` switch turns one kind of degradation off everywhere."""

    scale: int = 4
    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig = SECOND_STAGE
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    kernel_sizes: tuple[int, int] = (7, 21)  # odd sizes in this range
    blur_enabled: bool = True
    resize_enabled: bool = True
    noise_enabled: bool = True
    jpeg_enabled: bool = True
    second_stage_enabled: bool = True

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        lo, hi = self.kernel_sizes
        if lo % 2 == 0 or hi % 2 == 0 or lo > hi:
            raise ValueError(f"kernel_sizes must be odd and ordered, got {self.kernel_sizes}")


# ----------------------------------------------------------------------------- kernels

def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on a size x size grid centred at 0, for a rotated covariance."""
    half = size // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # coordinates along the kernel's own axes
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0) -> np.ndarray:
    """(Generalised) Gaussian: exp(-0.5 * q^beta); beta=1 is the ordinary Gaussian."""
    k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Plateau-shaped: 1 / (1 + q^beta), flat in the middle with heavy tails."""
    k = 1.0 / (1.0 + _quadratic_form(size, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) with cutoff in radians per pixel: ringing and overshoot artefacts."""
    try:
        from scipy.special import j1
    except ImportError as exc:
        raise MissingDependencyError(_NEEDS) from exc

    half = size // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * j1(cutoff * r) / (2 * np.pi * r)
    k[half, half] = cutoff**2 / (4 * np.pi)
    return k / k.sum()


def _draw_kernel(rng: np.random.Generator, cfg: StageConfig, sizes: tuple[int, int]) -> tuple[np.ndarray, dict]:
    size = int(rng.choice(np.arange(sizes[0], sizes[1] + 1, 2)))
    if rng.random() < cfg.sinc_prob:
        cutoff = float(rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi))
        return sinc_kernel(size, cutoff), {"kind": "sinc", "size": size, "cutoff": cutoff}
    kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=np.asarray(cfg.kernel_probs) / sum(cfg.kernel_probs)))]
    sx = float(rng.uniform(*cfg.blur_sigma))
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sy, theta = sx, 0.0
    else:
        sy, theta = float(rng.uniform(*cfg.blur_sigma)), float(rng.uniform(-np.pi, np.pi))
    params = {"kind": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}
    if kind.startswith("generalized"):
        params["beta"] = float(rng.uniform(*cfg.betag))
        return gaussian_kernel(size, sx, sy, theta, params["beta"]), params
    if kind.startswith("plateau"):
        params["beta"] = float(rng.uniform(*cfg.betap))
        return plateau_kernel(size, sx, sy, theta, params["beta"]), params
    return gaussian_kernel(size, sx, sy, theta), params


# ----------------------------------------------------------------------------- operations

_MODES = ("area", "bilinear", "bicubic")


_NEEDS = "the degradation pipeline needs OpenCV and SciPy: pip install 'pure-lite[eval]' (or [train])"


def check_dependencies() -> None:
    """Raise MissingDependencyError now, before a long run, if OpenCV or SciPy is missing."""
    _cv2()
    try:
        import scipy.special  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(_NEEDS) from exc


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError(_NEEDS) from exc
    return cv2


def filter_image(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def resize_image(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    cv2 = _cv2()
    flag = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[mode]
    return cv2.resize(img, (max(1, width), max(1, height)), interpolation=flag)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    cv2 = _cv2()
    as_bgr = (np.clip(img, 0, 1)[..., ::-1] * 255).round().astype(np.uint8)
    ok, data = cv2.imencode(".jpg", as_bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def add_noise(img: np.ndarray, rng: np.random.Generator, cfg: StageConfig) -> tuple[np.ndarray, dict]:
    gray = bool(rng.random() < cfg.gray_noise_prob)
    h, w, _ = img.shape
    if rng.random() < cfg.gaussian_noise_prob:
        sigma = float(rng.uniform(*cfg.noise_sigma))
        noise = rng.normal(0, sigma / 255.0, (h, w, 1) if gray else (h, w, 3))
        params = {"kind": "gaussian", "sigma": sigma, "gray": gray}
    else:
        scale = float(rng.uniform(*cfg.poisson_scale))
        base = img.mean(axis=2, keepdims=True) if gray else img
        levels = 255.0  # photon counts proportional to 8-bit intensity
        noise = (rng.poisson(np.clip(base, 0, 1) * levels) / levels - base) * scale
        params = {"kind": "poisson", "scale": scale, "gray": gray}
    return np.clip(img + noise, 0, 1).astype(np.float32), params


# ----------------------------------------------------------------------------- pipeline

@dataclass(frozen=True)
class Degraded:
    lq: np.ndarray  # float32 (H/scale) x (W/scale) x 3 in [0, 1]
    params: dict  # every value drawn, stage by stage
    strengths: dict[str, float]  # blur, noise, jpeg in [0, 1]
    levels: dict[str, str]  # small / medium / large per type


def level_of(strength: float) -> str:
    return LEVELS[0] if strength < 1 / 3 else LEVELS[1] if strength < 2 / 3 else LEVELS[2]


def _stage(img, rng, cfg: StageConfig, pipe: DegradationConfig, base_hw, blur: bool, params: list) -> np.ndarray:
    if pipe.blur_enabled and blur:
        kernel, p = _draw_kernel(rng, cfg, pipe.kernel_sizes)
        img = filter_image(img, kernel)
        params.append({"op": "blur", **p})
    if pipe.resize_enabled:
        kind = ("up", "down", "keep")[int(rng.choice(3, p=cfg.resize_probs))]
        factor = {"up": rng.uniform(1, cfg.resize_range[1]), "down": rng.uniform(cfg.resize_range[0], 1),
                  "keep": 1.0}[kind]
        mode = _MODES[int(rng.integers(3))]
        img = np.clip(resize_image(img, int(base_hw[0] * factor), int(base_hw[1] * factor), mode), 0, 1)
        params.append({"op": "resize", "kind": kind, "factor": float(factor), "mode": mode})
    if pipe.noise_enabled:
        img, p = add_noise(img, rng, cfg)
        params.append({"op": "noise", **p})
    if pipe.jpeg_enabled:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        img = jpeg(img, quality)
        params.append({"op": "jpeg", "quality": quality})
    return img


def degrade(hq: np.ndarray, rng: np.random.Generator, config: DegradationConfig = DegradationConfig()) -> Degraded:
    """Degrade an HQ image (float32 H x W x 3 in [0, 1]) to an LQ image of (H/scale, W/scale)."""
    if hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"expected H x W x 3, got {hq.shape}")
    h, w = hq.shape[:2]
    out_hw = (h // config.scale, w // config.scale)
    first: list[dict] = []
    second: list[dict] = []
    final: list[dict] = []
    img = _stage(hq.astype(np.float32), rng, config.first, config, (h, w), True, first)
    if config.second_stage_enabled:
        # the second stage resizes relative to the final LQ size's parent grid (H / scale x the factor)
        blur2 = bool(rng.random() < config.second_blur_prob)
        img = _stage(img, rng, config.second, config, out_hw, blur2, second)
    sinc = config.blur_enabled and rng.random() < config.final_sinc_prob
    kernel, sinc_params = (None, None)
    if sinc:
        size = int(rng.choice(np.arange(config.kernel_sizes[0], config.kernel_sizes[1] + 1, 2)))
        cutoff = float(rng.uniform(np.pi / 3, np.pi))
        kernel, sinc_params = sinc_kernel(size, cutoff), {"op": "sinc", "size": size, "cutoff": cutoff}
    mode = _MODES[int(rng.integers(3))]
    quality = int(rng.integers(config.first.jpeg_quality[0], config.first.jpeg_quality[1] + 1))
    jpeg_first = bool(rng.random() < 0.5)

    def resize_and_sinc(x):
        if x.shape[:2] != out_hw:
            x = resize_image(x, out_hw[0], out_hw[1], mode)
            final.append({"op": "resize", "mode": mode})
        if kernel is not None:
            x = filter_image(x, kernel)
            final.append(sinc_params)
        return np.clip(x, 0, 1)

    def final_jpeg(x):
        if config.jpeg_enabled:
            final.append({"op": "jpeg", "quality": quality})
            return jpeg(x, quality)
        return x

    img = resize_and_sinc(final_jpeg(img)) if jpeg_first else final_jpeg(resize_and_sinc(img))
    params = {"first": first, "second": second, "final": final}
    strengths = degradation_strengths(params)
    return Degraded(lq=np.clip(img, 0, 1).astype(np.float32), params=params, strengths=strengths,
                    levels={k: level_of(v) for k, v in strengths.items()})


def degradation_strengths(params: dict) -> dict[str, float]:
    """Per-type strength in [0, 1] from the drawn parameters; stages combine as 1 - prod(1 - s).

    blur:  Gaussian-family kernels by sqrt(sigma_x * sigma_y) / 3 (the first stage's largest sigma);
           sinc kernels by how far the cutoff lies below pi, over (pi - pi/5).
    noise: Gaussian sigma / 30 levels, Poisson scale / 3.
    jpeg:  (95 - the lowest quality applied) / (95 - 30).
    """
    blur, noise, quality = [], [], []
    for step in params["first"] + params["second"] + params["final"]:
        if step["op"] == "blur" and step["kind"] == "sinc" or step["op"] == "sinc":
            blur.append((np.pi - step["cutoff"]) / (np.pi - np.pi / 5))
        elif step["op"] == "blur":
            blur.append(math.sqrt(step["sigma_x"] * step["sigma_y"]) / 3.0)
        elif step["op"] == "noise":
            noise.append(step["sigma"] / 30.0 if step["kind"] == "gaussian" else step["scale"] / 3.0)
        elif step["op"] == "jpeg":
            quality.append(step["quality"])

    def combine(values):
        return float(1 - np.prod([1 - min(max(v, 0.0), 1.0) for v in values])) if values else 0.0

    jpeg_strength = (95 - min(quality)) / (95 - 30) if quality else 0.0
    return {"noise": combine(noise), "blur": combine(blur), "jpeg": float(min(max(jpeg_strength, 0.0), 1.0))}
