"""Train PURE-tiny, the package's default demonstration model, from licensed photographs.

    pip install torch==2.13.0 && pip install -e ".[export,train,pure-tiny]"
    python -m pure_lite.train.photo_sources fetch ~/.cache/pure-lite-photos       # apt-get download, no root
    pure-lite convert-lpips --net vgg16                                           # stage 3's loss network
    python examples/train_pure_tiny.py build/pure-tiny --photos ~/.cache/pure-lite-photos --install int8

Every stage uses the project's own pipeline and a fixed seed, and is skipped (or resumed) when its
output already exists, so an interrupted run picks up where it stopped:

 1. pack       pure_lite.train.photo_sources: the bundled photos (scikit-image, scikit-learn,
               matplotlib) and the hand-checked Debian wallpaper photographs, split by photo into
               training and held-out sets; pure_lite.train.pack cuts random windows of the training
               photos (128 px, log-uniform scale), degrades each twice (Real-ESRGAN-style, 32x32 LQ)
               and writes BUILD/pack/train.npz (<= 60 MB), the only input of stage 2; the held-out
               photos give BUILD/pack/heldout.npz and its HQ crops as BUILD/heldout/*.png
 2. train      pure_lite.train.pack_train: VQ, then the language model, on CUDA when present, else
               CPU (slow: days at the default step counts; every part checkpoints and resumes).
               ``--pack-only`` stops before it, to carry the pack to a GPU machine instead
               (docs/pure-tiny.md, "Training on a GPU"); ``--trained DIR`` takes that run's
               OUT/model and goes on with stage 3
 3. decoder    pure_lite.train.decoder_tune: the tokenizer's decoder alone trained further on the pack's
               HQ crops with LPIPS-VGG16 added to its pixel loss (sharper; every code, and so the
               language model, unchanged); BUILD/decoder/model (~35 min on our 2-core CPU)
 4. samples    pure_lite.train.sampled_codes: that model's int8 export (BUILD/sampler) restores
               SAMPLED_CROPS of the pack's LQ crops and keeps the codes it sampled (~32 min here)
 5. redecoder  decoder_tune --codes: the decoder trained again, now to draw each HQ crop from the
               codes the language model sampled for it, which are mostly not the crop's own
               (docs/pure-tiny.md, v5); BUILD/decoder-sampled/model (~50 min here)
 6. export     ``export_onnx`` float / int8 / int4 (manifest image_size 128)

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
LQ_PER_CROP, EVAL_CROPS_PER_PHOTO = 2, 4
SAMPLED_CROPS = 2400  # stage 4: crops whose sampled codes stage 5 trains on (v5: 2400 of v3's 3234)


def _loader(path: Path):
    from pure_lite.images import load_image

    return lambda: load_image(path)


def stage_pack(build: Path, cache: Path | None, crops_per_photo: int | None = None) -> Path:
    """BUILD/pack/train.npz (as many crops as fit 60 MB, or ``crops_per_photo``), heldout.npz and BUILD/heldout/*.png.

    A pack over 60 MB cannot travel to a GPU machine; its tokens can (docs/pure-tiny.md, "Training on a GPU").
    """
    from pure_lite.images import save_image_atomic, to_pil
    from pure_lite.train.pack import MAX_PACK_BYTES, build_pack, load_pack, max_crops
    from pure_lite.train.photo_sources import locate, split

    parts = split()
    train, held = build / "pack" / "train.npz", build / "pack" / "heldout.npz"
    if not (train.exists() and held.exists()):  # every photo found before any crop is cut, or one clear error
        paths = {p.key: locate(p, cache) for p in parts["train"] + parts["heldout"]}
    if not train.exists():
        photos = [(p.key, _loader(paths[p.key])) for p in parts["train"]]
        per_photo = crops_per_photo or max_crops(LQ_PER_CROP, SIZE, SCALE, photos=len(photos)) // len(photos)
        build_pack(photos, train, crops_per_photo=per_photo, lq_per_crop=LQ_PER_CROP, size=SIZE, scale=SCALE, seed=SEED,
                   max_bytes=sys.maxsize if crops_per_photo else MAX_PACK_BYTES)
    if not held.exists():
        photos = [(p.key, _loader(paths[p.key])) for p in parts["heldout"]]
        build_pack(photos, held, crops_per_photo=EVAL_CROPS_PER_PHOTO, lq_per_crop=1, size=SIZE, scale=SCALE,
                   seed=SEED + 1)
    pack = load_pack(held)
    for i, crop in enumerate(pack.hq):  # what benchmarks/pure_tiny.py scores
        dst = build / "heldout" / f"heldout_{i:05d}.png"
        if not dst.exists():
            save_image_atomic(to_pil(crop.astype(np.float32) / 255.0), dst)
    return train


def stage_train(build: Path, pack: Path) -> Path:
    from pure_lite.train.pack_train import run

    model = run(pack, build / "train")
    if model is None:
        sys.exit("training stopped before the end; run the same command again to resume")
    return model


def stage_decoder(build: Path, pack: Path, model: Path) -> Path:
    from pure_lite.train.decoder_tune import tune_decoder

    tuned = tune_decoder(model, pack, build / "decoder", heldout=build / "pack" / "heldout.npz")
    if tuned is None:
        sys.exit("decoder tuning stopped before the end; run the same command again to resume")
    return tuned


def stage_samples(build: Path, pack: Path, model: Path) -> Path:
    """BUILD/sampled-codes.npz: the codes MODEL's int8 export samples for the pack's LQ crops (the
    shipped export samples the same codes: the decoder is the only part stages 3 and 5 change)."""
    from pure_lite.export import export_onnx
    from pure_lite.train.sampled_codes import sample_pack_codes

    sampler = build / "sampler"
    if not (sampler / "pure_lite_manifest.json").exists():
        export_onnx(model, sampler, quantization="int8", image_size=SIZE, overwrite=True)
    codes = sample_pack_codes(sampler, pack, build / "sampled-codes.npz", limit=SAMPLED_CROPS)
    if codes is None:
        sys.exit("sampling stopped before the end; run the same command again to resume")
    return codes


def stage_redecoder(build: Path, pack: Path, model: Path, codes: Path) -> Path:
    from pure_lite.train.decoder_tune import tune_decoder

    tuned = tune_decoder(model, pack, build / "decoder-sampled", heldout=build / "pack" / "heldout.npz", codes=codes)
    if tuned is None:
        sys.exit("decoder tuning stopped before the end; run the same command again to resume")
    return tuned


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
    ap.add_argument("--photos", type=Path, help="the folder `python -m pure_lite.train.photo_sources fetch` filled")
    ap.add_argument("--pack-only", action="store_true", help="stop once BUILD/pack/train.npz is written")
    ap.add_argument("--crops-per-photo", type=int, default=None,
                    help="crops cut from each training photo (default: as many as fit a 60 MB pack, 22 for the "
                         "49 photos); more make a pack too big to carry: tokenize it here instead "
                         "(python -m pure_lite.train.pack_train PACK OUT --work W --tokens-only)")
    ap.add_argument("--trained", type=Path, help="a trained model folder (pack_train's OUT/model): skip training")
    ap.add_argument("--install", choices=["float", "int8", "int4"], help="copy this export into the package")
    args = ap.parse_args()
    from pure_lite.train.photo_sources import PhotoSourceError

    build = args.build
    try:
        pack = stage_pack(build, args.photos, args.crops_per_photo)
    except PhotoSourceError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.pack_only:
        print(f"pack: {pack} ({pack.stat().st_size / 1e6:.1f} MB)")
        return
    model = args.trained or stage_train(build, pack)
    try:
        model = stage_decoder(build, pack, model)
        model = stage_redecoder(build, pack, model, stage_samples(build, pack, model))
    except FileNotFoundError as exc:  # the loss network's weights: `pure-lite convert-lpips --net vgg16`
        raise SystemExit(f"error: {exc}") from None
    stage_export(build, model)
    if args.install:
        print(f"installed {install(build, args.install)}")


if __name__ == "__main__":
    main()
