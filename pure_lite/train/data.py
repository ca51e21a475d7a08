"""``pure-lite prepare-data``: HQ photos -> LQ/HQ pairs and a conversations JSON in PURE's format.

    DATA_DIR/
      hq/<name>.png                 the HQ image, cropped square and resized to --size
      lq/<name>_<k>.png             its k-th degraded version (size / scale)
      conversations.json            one record per pair (below)
      report.json                   counts, and every skipped input with its reason

A record:

    {"id": "<name>_<k>", "image": ["lq/<name>_<k>.png", "hq/<name>.png"],
     "degradation": {"noise": "small", ...}, "strengths": {...}, "seed": ...,
     "conversations": [{"from": "human", "value": INSTRUCTION + "<|image|>"},
                       {"from": "gpt", "value": "The image has ... JPEG artifacts. <caption> <|image|>"}]}

The assistant's text is ``prompt.DEGRADATION_TEMPLATE`` filled with the drawn levels, then the
caption when one is given; the restore pipeline's parser reads both back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from ..errors import InvalidImageError
from ..images import load_image, save_image_atomic, to_pil
from ..prompt import INSTRUCTION, degradation_sentence
from .degrade import DegradationConfig, degrade

IMAGE_PLACEHOLDER = "<|image|>"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class BuildReport:
    written: int = 0
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})


def square_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, resized to size x size (area when shrinking, bicubic when growing)."""
    from .degrade import resize_image

    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top:top + side, left:left + side]
    return np.clip(resize_image(crop, size, size, "area" if side > size else "bicubic"), 0, 1)


def _write_json_atomic(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def prepare_data(
    hq_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int = 512,
    scale: int = 4,
    pairs_per_image: int = 1,
    captions: dict[str, str] | None = None,
    seed: int = 0,
    config: DegradationConfig | None = None,
    progress: Callable | None = None,
) -> BuildReport:
    """Build the training set. Unreadable inputs are reported and skipped; existing files are kept."""
    if size % 32 or size <= 0:
        raise ValueError(f"size must be a positive multiple of 32, got {size}")
    if size // scale % 32:
        raise ValueError(f"size / scale must be a multiple of 32 (got {size} / {scale})")
    config = config or DegradationConfig(scale=scale)
    src, out = Path(hq_dir), Path(out_dir)
    (out / "hq").mkdir(parents=True, exist_ok=True)
    (out / "lq").mkdir(exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    report, records = BuildReport(), []
    iterator = progress(files, desc="degrading", unit="image") if progress else files
    for index, path in enumerate(iterator):
        try:
            hq = square_crop(load_image(path), size)
        except InvalidImageError as exc:
            report.skip(path, str(exc))
            continue
        save_image_atomic(to_pil(hq), out / "hq" / f"{path.stem}.png")
        for k in range(pairs_per_image):
            pair_seed = seed * 1_000_003 + index * 1_009 + k
            result = degrade(hq, np.random.default_rng(pair_seed), config)
            name = f"{path.stem}_{k}"
            save_image_atomic(to_pil(result.lq), out / "lq" / f"{name}.png")
            answer = degradation_sentence(result.levels)
            caption = (captions or {}).get(path.name) or (captions or {}).get(path.stem)
            if caption:
                answer += " " + caption.strip()
            records.append({
                "id": name, "image": [f"lq/{name}.png", f"hq/{path.stem}.png"], "seed": pair_seed,
                "degradation": result.levels, "strengths": result.strengths,
                "conversations": [
                    {"from": "human", "value": INSTRUCTION + IMAGE_PLACEHOLDER},
                    {"from": "gpt", "value": answer + " " + IMAGE_PLACEHOLDER},
                ],
            })
            report.written += 1
    _write_json_atomic(out / "conversations.json", records)
    _write_json_atomic(out / "report.json", {"written": report.written, "skipped": report.skipped})
    return report


def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """Captions file: JSON {"file name or stem": "caption"}."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: captions must be a JSON object mapping image names to text")
    return {str(k): str(v) for k, v in data.items()}
