"""Train PURE-tiny, the package's default demonstration model, from photos that ship inside packages.

    pip install torch==2.13.0 && pip install -e ".[export,train,pure-tiny]"
    python examples/train_pure_tiny.py build/pure-tiny --install int8   # about an hour on 2 CPU cores

Every stage uses the project's own pipeline and a fixed seed, and is skipped when its output
already exists, so an interrupted run picks up where it stopped:

 1. photos     scikit-image's, scikit-learn's and matplotlib's bundled photos, split by photo into
               training and held-out sets (HELD_OUT below); the held-out photos never reach training
 2. crops      random square windows of the training photos (128 px up to the photo's short side),
               area-resized to 128x128, random horizontal flips: the HQ training set
 3. vq         ``train_vq``: a narrow LlamaGen-architecture VQ-8 (channels 32/32/64/64, 1024 codes),
               L1 + VQ losses only (the patch-GAN term made held-out reconstructions worse here)
 4. init       a narrow Chameleon (hidden 256, 6 layers, 4 heads) with a compact vocabulary
               (byte-level text, 1024 image codes), random init, plus the trained VQ
 5. data       ``prepare_data``: Real-ESRGAN-style degradation, 128x128 HQ from 32x32 LQ
 6. lm         ``pretokenize`` + ``train`` (full fine-tuning from scratch)
 7. export     ``export_onnx`` float / int8 / int4 (manifest image_size 128)

The held-out evaluation crops (BUILD/heldout, 4 windows per held-out photo) are written in stage 2.
``--install`` copies the chosen export into ``pure_lite/models/pure_tiny`` (what ``pure-lite
restore`` uses without ``--model``) and remakes ``examples/images/example.png`` and the README
picture. Then ``python benchmarks/pure_tiny.py BUILD`` measures it (docs/pure-tiny.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

SIZE, SCALE, SEED = 128, 4, 0
HELD_OUT = {"chelsea", "coffee", "flower", "grace_hopper"}
CROPS, EVAL_CROPS_PER_PHOTO = 3000, 4
VQ = dict(base_channels=32, channel_mult=(1, 1, 2, 2), z_channels=32, codebook_size=1024)
LM = dict(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=768, max_position_embeddings=1024)
VQ_STEPS, VQ_LR, LM_STEPS, LM_BATCH, LM_LR = 3000, 5e-4, 2500, 4, 1e-3


def bundled_photos() -> dict[str, Path]:
    """Name -> path of every photo we use (the grey ones become grey RGB when loaded)."""
    import matplotlib
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
             "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "page.png", "text.png"]
    photos = {Path(n).stem: sk / n for n in names}
    for n in ("china.jpg", "flower.jpg"):
        photos[Path(n).stem] = Path(sklearn.__file__).parent / "datasets" / "images" / n
    photos["grace_hopper"] = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    return photos


def random_crops(photos: list[np.ndarray], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from pure_lite.train.degrade import resize_image

    out = []
    for _ in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        side = int(rng.integers(SIZE, min(h, w) + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = img[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(np.clip(resize_image(np.ascontiguousarray(crop), SIZE, SIZE, "area"), 0, 1))
    return out


def stage_photos(build: Path) -> None:
    from pure_lite.images import load_image, save_image_atomic, to_pil

    for name, path in bundled_photos().items():
        split = "heldout" if name in HELD_OUT else "train"
        dst = build / "photos" / split / f"{name}.png"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(to_pil(load_image(path)), dst)


def stage_crops(build: Path, split: str, n: int, folder: str) -> None:
    from pure_lite.images import load_image, save_image_atomic, to_pil

    out = build / folder
    if out.is_dir() and len(list(out.glob("*.png"))) == n:
        return
    out.mkdir(parents=True, exist_ok=True)
    photos = [load_image(p) for p in sorted((build / "photos" / split).glob("*.png"))]
    rng = np.random.default_rng(SEED if split == "train" else SEED + 1)
    for i, crop in enumerate(random_crops(photos, n, rng)):
        save_image_atomic(to_pil(crop), out / f"{split}_{i:05d}.png")


def stage_vq(build: Path) -> Path:
    from pure_lite.train.vq_train import VQTrainConfig, train_vq
    from pure_lite.vq import VQConfig

    out = build / "vq"
    if not (out / "vq_ds8_c2i.pt").exists():
        train_vq(build / "crops", out, VQConfig(**VQ), VQTrainConfig(steps=VQ_STEPS, batch_size=8, crop=64, lr=VQ_LR, disc_weight=0.0, seed=SEED))
    return out / "vq_ds8_c2i.pt"


def stage_init(build: Path, vq_file: Path) -> Path:
    from pure_lite.testing import make_tiny_checkpoint

    out = build / "init"
    if not (out / "config.json").exists():
        make_tiny_checkpoint(out, seed=SEED, layout="compact", compact_codebook=VQ["codebook_size"],
                             init_std=0.02, vq_base_channels=VQ["base_channels"], **LM)
        shutil.copyfile(vq_file, out / "vq_ds8_c2i.pt")
        (out / "tiny_checkpoint.json").unlink()
    return out


def stage_lm(build: Path, init: Path) -> Path:
    from pure_lite.train.config import TrainConfig
    from pure_lite.train.data import prepare_data
    from pure_lite.train.finetune import train
    from pure_lite.train.pretokenize import pretokenize

    data, out = build / "data", build / "model"
    if not (data / "conversations.json").exists():
        prepare_data(build / "crops", data, size=SIZE, scale=SCALE, pairs_per_image=1, seed=SEED)
    if not (out / "config.json").exists():
        pretokenize(data, init, data / "tokens")
        config = TrainConfig(lr=LM_LR, max_steps=LM_STEPS, batch_size=LM_BATCH, warmup_steps=200, dropout=0.0,
                             save_every=500, log_every=25, seed=SEED)
        train(init, data / "tokens", out, config, device="cpu")
    return out


def stage_export(build: Path, model: Path) -> None:
    from pure_lite.export import export_onnx

    for name, weights in (("float", None), ("int8", "int8"), ("int4", "int4")):
        out = build / f"export-{name}"
        if not (out / "pure_lite_manifest.json").exists():
            export_onnx(model, out, quantization=weights, image_size=SIZE, overwrite=True)


def install(build: Path, variant: str, example: str = "heldout_00000.png") -> Path:
    """Copy an export into the package as the default model, and remake the examples and the README picture.

    ``examples/images/example.png`` is a held-out crop degraded with the training pipeline (seed 0),
    saved at its LQ size; the README's photo and picture come from examples/readme_example.py.
    """
    from pure_lite.images import load_image, save_image_atomic, to_pil
    from pure_lite.train.degrade import DegradationConfig, degrade

    root = Path(__file__).resolve().parents[1]
    dst = root / "pure_lite" / "models" / "pure_tiny"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(build / f"export-{variant}", dst)

    hq = load_image(build / "heldout" / example)
    lq = degrade(hq, np.random.default_rng(SEED), DegradationConfig(scale=SCALE)).lq
    save_image_atomic(to_pil(lq), root / "examples" / "images" / "example.png")
    sys.path.insert(0, str(root / "examples"))
    from readme_example import make

    print(f"example text: {make(dst)!r}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", type=Path, help="working folder (created; reruns resume)")
    ap.add_argument("--install", choices=["float", "int8", "int4"], help="copy this export into the package")
    args = ap.parse_args()
    build = args.build
    stage_photos(build)
    stage_crops(build, "train", CROPS, "crops")
    stage_crops(build, "heldout", EVAL_CROPS_PER_PHOTO * len(HELD_OUT), "heldout")
    model = stage_lm(build, stage_init(build, stage_vq(build)))
    stage_export(build, model)
    if args.install:
        print(f"installed {install(build, args.install)}")


if __name__ == "__main__":
    main()
