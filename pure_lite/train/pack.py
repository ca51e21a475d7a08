"""Training packs: HQ crops and their degraded LQ versions in one ``.npz``, for training where nothing else is.

A GPU machine borrowed for ten minutes has no apt, no scikit-image, no OpenCV and no internet, so
everything a training run needs from the photos is prepared here, on a machine that has them,
and carried over as one file (at most ``MAX_PACK_BYTES``):

    hq       uint8 (N, S, S, 3)            HQ crops, S = 128
    lq       uint8 (N, K, S/r, S/r, 3)     K degraded versions of each crop (the second-order pipeline
                                           in degrade.py needs OpenCV and SciPy, so it runs here)
    levels   uint8 (N, K, 3)               index into degrade.LEVELS of (noise, blur, jpeg) per version
    photo    int32 (N,)                    index into ``photos`` of the photo each crop was cut from
    photos   str (P,)                      photo keys (photo_sources.Photo.key)
    meta     str ()                        JSON: format version, size, scale, seed, crops per photo

Plain ``np.savez`` (no pickle, no compression: photos barely compress and the size is then
known before writing). Loading needs numpy only. Crops are square windows whose side is drawn
log-uniformly between S and the photo's short side (so fine texture and whole scenes are both
common), area-resized to S; every crop and every degradation draws from its own seeded
generator, so a pack is reproducible crop by crop.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..atomic import atomic_path
from ..errors import PureLiteError

PACK_FORMAT = 1
MAX_PACK_BYTES = 60_000_000  # what the issue allows a device run to carry (60 MB)
_ARRAYS = ("hq", "lq", "levels", "photo", "photos", "meta")


class PackError(PureLiteError, ValueError):
    """A training pack that is too large, malformed, or of another format version."""


@dataclass(frozen=True)
class TrainingPack:
    hq: np.ndarray  # uint8 (N, S, S, 3)
    lq: np.ndarray  # uint8 (N, K, S/r, S/r, 3)
    levels: np.ndarray  # uint8 (N, K, 3): noise, blur, jpeg
    photo: np.ndarray  # int32 (N,)
    photos: tuple[str, ...]
    meta: dict

    @property
    def size(self) -> int:
        return int(self.hq.shape[1])

    @property
    def scale(self) -> int:
        return self.size // int(self.lq.shape[2])

    def __len__(self) -> int:
        return int(self.hq.shape[0])


def pack_bytes(n: int, k: int, size: int, scale: int) -> int:
    """The array bytes of a pack of n crops with k LQ versions each (the file adds about 1 kB of headers)."""
    lq_side = size // scale
    return n * (size * size * 3 + k * lq_side * lq_side * 3 + k * 3 + 4)


def _headroom(photos: int) -> int:
    """Bytes kept free for the .npz headers, the photo keys and meta."""
    return 65536 + 256 * photos


def max_crops(k: int, size: int = 128, scale: int = 4, max_bytes: int = MAX_PACK_BYTES, photos: int = 200) -> int:
    """The most crops that fit ``max_bytes`` beside the headers and photo list."""
    return max(0, (max_bytes - _headroom(photos)) // pack_bytes(1, k, size, scale))


def random_window(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square window (side log-uniform in [size, short side]), area-resized to size, maybe flipped."""
    from .degrade import resize_image

    h, w = img.shape[:2]
    short = min(h, w)
    side = int(round(math.exp(rng.uniform(math.log(size), math.log(short))))) if short > size else short
    side = min(max(side, min(size, short)), short)
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = img[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.ascontiguousarray(crop)
    if side != size:
        crop = resize_image(crop, size, size, "area" if side > size else "bicubic")
    return np.clip(crop, 0, 1).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0).round().astype(np.uint8)


def build_pack(
    photos: Iterable[tuple[str, Callable[[], np.ndarray]]],
    out: str | os.PathLike,
    *,
    crops_per_photo: int,
    lq_per_crop: int = 2,
    size: int = 128,
    scale: int = 4,
    seed: int = 0,
    max_bytes: int = MAX_PACK_BYTES,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Cut ``crops_per_photo`` windows from each (key, loader) photo, degrade each ``lq_per_crop`` times, save.

    ``loader()`` returns the photo as float32 H x W x 3 in [0, 1]; photos are loaded one at a time
    (a 5120 x 2880 wallpaper is 180 MB as floats). The pack's size is checked before anything is
    cut, and PackError says how many crops would fit. The file is written atomically.
    """
    from .degrade import DEGRADATION_TYPES, LEVELS, DegradationConfig, check_dependencies, degrade

    photos = list(photos)
    if size % 32 or (size // scale) % 8 or size % scale:
        raise PackError(f"size must be a multiple of 32 and size / scale a multiple of 8, got {size} / {scale}")
    if crops_per_photo < 1 or lq_per_crop < 1 or not photos:
        raise PackError("a pack needs at least one photo, one crop per photo and one LQ version per crop")
    n = crops_per_photo * len(photos)
    need = pack_bytes(n, lq_per_crop, size, scale) + _headroom(len(photos))
    if need > max_bytes:
        fit = max_crops(lq_per_crop, size, scale, max_bytes, len(photos)) // len(photos)
        raise PackError(f"{n} crops with {lq_per_crop} LQ versions each take {need / 1e6:.1f} MB, over the "
                        f"{max_bytes / 1e6:.1f} MB limit: use at most {fit} crops per photo for {len(photos)} photos")
    check_dependencies()
    say = log or (lambda message: None)
    lq_side = size // scale
    hq = np.empty((n, size, size, 3), np.uint8)
    lq = np.empty((n, lq_per_crop, lq_side, lq_side, 3), np.uint8)
    levels = np.empty((n, lq_per_crop, 3), np.uint8)
    photo = np.empty(n, np.int32)
    config = DegradationConfig(scale=scale)
    for p, (key, loader) in enumerate(photos):
        img = loader()
        if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < size // 2:
            raise PackError(f"{key}: expected an H x W x 3 photo with a short side of at least {size // 2}, "
                            f"got {img.shape}")
        for c in range(crops_per_photo):
            i = p * crops_per_photo + c
            crop = random_window(img, size, np.random.default_rng([seed, p, c]))
            hq[i], photo[i] = _to_uint8(crop), p
            for k in range(lq_per_crop):
                result = degrade(hq[i].astype(np.float32) / 255.0, np.random.default_rng([seed, p, c, k + 1]), config)
                lq[i, k] = _to_uint8(result.lq)
                levels[i, k] = [LEVELS.index(result.levels[t]) for t in DEGRADATION_TYPES]
        say(f"pack: {p + 1}/{len(photos)} {key}")
        del img
    meta = {"format": PACK_FORMAT, "size": size, "scale": scale, "seed": seed, "crops_per_photo": crops_per_photo,
            "lq_per_crop": lq_per_crop, "level_types": list(DEGRADATION_TYPES), "levels": list(LEVELS),
            "crop": "square window, side log-uniform in [size, short side], area-resized, random h-flip"}
    out = Path(out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, hq=hq, lq=lq, levels=levels, photo=photo,
                     photos=np.array([key for key, _ in photos]), meta=np.array(json.dumps(meta)))
        if tmp.stat().st_size > max_bytes:  # pack_bytes should have caught it; never publish an oversized pack
            raise PackError(f"{out}: {tmp.stat().st_size} bytes written, over the {max_bytes}-byte limit")
    return out


def load_pack(path: str | os.PathLike, *, max_bytes: int = MAX_PACK_BYTES) -> TrainingPack:
    """Read and check a pack (numpy only; no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: no such training pack (build one with `python examples/train_pure_tiny.py "
                        "BUILD --pack-only`)")
    if path.stat().st_size > max_bytes:
        raise PackError(f"{path} is {path.stat().st_size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in _ARRAYS if a not in z.files]
            if missing:
                raise PackError(f"{path} is not a training pack: no {', '.join(missing)}")
            arrays = {a: z[a] for a in _ARRAYS}
    except (OSError, ValueError) as exc:
        if isinstance(exc, PackError):
            raise
        raise PackError(f"{path} is not a readable training pack: {exc}") from exc
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise PackError(f"{path}: meta is not JSON ({exc})") from exc
    if meta.get("format") != PACK_FORMAT:
        raise PackError(f"{path} has pack format {meta.get('format')!r}; this pure-lite reads format {PACK_FORMAT}")
    hq, lq, levels, photo = arrays["hq"], arrays["lq"], arrays["levels"], arrays["photo"]
    n = hq.shape[0] if hq.ndim == 4 else -1
    checks = [
        (hq.dtype == np.uint8 and hq.ndim == 4 and hq.shape[1] == hq.shape[2] and hq.shape[3] == 3,
         f"hq must be uint8 (N, S, S, 3), got {hq.dtype} {hq.shape}"),
        (lq.dtype == np.uint8 and lq.ndim == 5 and lq.shape[0] == n and lq.shape[2] == lq.shape[3]
         and lq.shape[4] == 3 and lq.shape[2] > 0 and hq.shape[1] % lq.shape[2] == 0,
         f"lq must be uint8 (N, K, S/r, S/r, 3) with N = {n}, got {lq.dtype} {lq.shape}"),
        (levels.dtype == np.uint8 and levels.shape == lq.shape[:2] + (3,) and (levels < 3).all(),
         f"levels must be uint8 (N, K, 3) in 0..2, got {levels.dtype} {levels.shape}"),
        (photo.dtype == np.int32 and photo.shape == (n,) and (photo >= 0).all() and (photo < len(arrays["photos"])).all(),
         f"photo must be int32 (N,) indices into photos, got {photo.dtype} {photo.shape}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PackError(f"{path}: {message}")
    return TrainingPack(hq=hq, lq=lq, levels=levels, photo=photo,
                        photos=tuple(str(p) for p in arrays["photos"]), meta=meta)


def hq_batch(hq: np.ndarray, rng: np.random.Generator, n: int, crop: int) -> np.ndarray:
    """n random crop x crop windows of random pack crops, randomly flipped: float32 (n, 3, crop, crop) in [-1, 1].

    The tokenizer's training batches (pack crops were already flipped at random when cut; the
    second flip here doubles the variety of the windows seen).
    """
    side = hq.shape[1]
    if crop > side:
        raise PackError(f"crop {crop} is larger than the pack's {side}-pixel crops")
    idx = rng.integers(len(hq), size=n)
    top, left = rng.integers(side - crop + 1, size=n), rng.integers(side - crop + 1, size=n)
    flip = rng.random(n) < 0.5
    windows = np.lib.stride_tricks.sliding_window_view(hq, (crop, crop), axis=(1, 2))  # (N, y, x, 3, crop, crop), a view
    # (n, 3, crop, crop): one gather, no Python loop; order="C", or it keeps the pack's pixel-last memory
    # order (train_vq_on would then copy every batch to make it contiguous)
    out = windows[idx, top, left].astype(np.float32, order="C")
    out[flip] = out[flip, :, :, ::-1]
    return out / np.float32(127.5) - np.float32(1.0)
