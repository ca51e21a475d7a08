"""Remake the README's example photo and picture with the default model.

    python examples/readme_example.py

The photo is scikit-image's "coffee" (CC0, held out from PURE-tiny's training), resized to
384x256 and degraded with the training pipeline (x4, seed 0): ``examples/images/photo.png``
(96x64). It was chosen because it is the held-out photo ``pure-lite eval`` uses, not for how it
comes out. The picture shows the input (nearest), bicubic x4, PURE-tiny x4 (seed 0; 12 tiles)
and the original: ``docs/images/pure_tiny_example.png``.
"""

from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, SCALE, SEED = 384, 256, 4, 0


def make(model=None) -> str:
    from skimage import data

    from pure_lite import Restorer
    from pure_lite.images import resize, save_image_atomic, to_pil
    from pure_lite.train.degrade import DegradationConfig, degrade

    hq = resize(data.coffee().astype(np.float32) / 255, WIDTH, HEIGHT)
    lq = degrade(hq, np.random.default_rng(SEED), DegradationConfig(scale=SCALE)).lq
    photo = ROOT / "examples" / "images" / "photo.png"
    save_image_atomic(to_pil(lq), photo)
    restored = Restorer.from_pretrained(model).restore(photo, seed=SEED, scale=SCALE)
    nearest = np.asarray(to_pil(lq).resize((WIDTH, HEIGHT), Image.NEAREST), np.float32) / 255
    panels = [nearest, resize(lq, WIDTH, HEIGHT), np.asarray(restored.image, np.float32) / 255, hq]
    gap = np.ones((HEIGHT, 4, 3), np.float32)
    strip = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
    save_image_atomic(to_pil(strip), ROOT / "docs" / "images" / "pure_tiny_example.png")
    return restored.text


if __name__ == "__main__":
    print(f"example text: {make()!r}")
