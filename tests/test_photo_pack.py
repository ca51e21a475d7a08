"""PURE-tiny v2's data path: the photo list and its split, training packs, and the pack-only training run.

All offline: the Debian packages are stood in for by a fake unpacked folder, and packs are built
from small synthetic images.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pure_lite.train import photo_sources as ps

# ----------------------------------------------------------------------------- photo list and split


def test_every_photo_has_a_licence_and_a_unique_key_and_name():
    photos = ps.all_photos()
    assert len(ps.DEBIAN_PHOTOS) >= 40
    for p in photos:
        assert p.licence.strip() and p.source and p.path, p
    assert len({p.key for p in photos}) == len(photos)
    assert len({p.name for p in photos}) == len(photos)


def test_split_is_by_photo_disjoint_complete_and_independent_of_order():
    parts = ps.split()
    train, held = {p.key for p in parts["train"]}, {p.key for p in parts["heldout"]}
    assert train.isdisjoint(held)
    assert train | held == {p.key for p in ps.all_photos()}
    shuffled = list(ps.all_photos())
    np.random.default_rng(1).shuffle(shuffled)
    again = ps.split(tuple(shuffled))
    assert {p.key for p in again["heldout"]} == held  # membership depends on the photo alone
    assert ps.split() == parts
    # v1's held-out photos stay held out, and the Debian photos contribute to both sides
    assert {p.name for p in parts["heldout"] if p.source in ("scikit-image", "scikit-learn", "matplotlib")} == {
        "scikit-image-chelsea", "scikit-image-coffee", "scikit-learn-flower", "matplotlib-grace_hopper"}
    debian_held = [p for p in parts["heldout"] if p in ps.DEBIAN_PHOTOS]
    assert 0.1 < len(debian_held) / len(ps.DEBIAN_PHOTOS) < 0.4


def test_licence_table_lists_every_photo_once():
    table = ps.licence_table()
    for p in ps.all_photos():
        assert table.count(f"`{p.path}`") == 1


def test_locate_finds_photos_in_an_unpacked_cache_and_names_what_is_missing(tmp_path):
    photo = ps.DEBIAN_PHOTOS[0]
    (tmp_path / photo.source / photo.path).parent.mkdir(parents=True)
    (tmp_path / photo.source / photo.path).write_bytes(b"jpeg")
    assert ps.locate(photo, tmp_path) == tmp_path / photo.source / photo.path
    with pytest.raises(ps.PhotoSourceError, match="fetch"):
        ps.locate(ps.DEBIAN_PHOTOS[-1], tmp_path)
    with pytest.raises(ps.PhotoSourceError, match="cache folder"):
        ps.locate(photo, None)


def test_the_recipe_names_a_missing_photo_before_cutting_any_crop(tmp_path):
    """examples/train_pure_tiny.py with a --photos folder that lacks the Debian photos (here: an empty one,
    as when the fetch wrote elsewhere): one error line, exit status 1, nothing made in BUILD."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "examples" / "train_pure_tiny.py"
    (tmp_path / "photos").mkdir()
    run = subprocess.run([sys.executable, str(recipe), str(tmp_path / "build"), "--photos", str(tmp_path / "photos"),
                          "--pack-only"], capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    # the first photo missing: a Debian one, or a bundled one where its package is not installed
    assert run.returncode == 1 and len(errors) == 1, run.stderr
    assert "does not exist" in errors[0] or "is not installed" in errors[0], errors
    assert "Traceback" not in run.stderr and not (tmp_path / "build").exists()


def test_fetch_skips_packages_already_unpacked(tmp_path, monkeypatch):
    for package in ps.DEBIAN_PACKAGES:
        (tmp_path / package / "usr").mkdir(parents=True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"fetch ran {args} although every package was unpacked")

    monkeypatch.setattr(ps.subprocess, "run", no_network)
    monkeypatch.setattr(ps.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert ps.fetch(tmp_path, log=lambda m: None) == tmp_path


def test_fetch_reports_a_failed_download(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package nope"

    monkeypatch.setattr(ps.subprocess, "run", lambda *a, **k: Failed())
    monkeypatch.setattr(ps.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    with pytest.raises(ps.PhotoSourceError, match="Unable to locate"):
        ps.fetch(tmp_path, ("nope",), log=lambda m: None)
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------- packs


def _synthetic_photos(n: int = 2, side: int = 96):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:side, 0:side + 16 * i] / side
        img = np.stack([np.sin(6 * x + i), np.cos(5 * y), x * y], axis=2) * 0.4 + 0.5
        img = img + rng.normal(0, 0.02, img.shape)
        out.append((f"synthetic:{i}", (lambda img=img: np.clip(img, 0, 1).astype(np.float32))))
    return out


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    pytest.importorskip("cv2")
    pytest.importorskip("scipy")
    from pure_lite.train.pack import build_pack

    path = tmp_path_factory.mktemp("pack") / "train.npz"
    return build_pack(_synthetic_photos(), path, crops_per_photo=3, lq_per_crop=2, size=64, scale=4, seed=0, log=None)


def test_pack_round_trip_shapes_dtypes_and_determinism(tiny_pack, tmp_path):
    from pure_lite.train.pack import build_pack, load_pack, pack_bytes

    pack = load_pack(tiny_pack)
    assert pack.hq.shape == (6, 64, 64, 3) and pack.hq.dtype == np.uint8
    assert pack.lq.shape == (6, 2, 16, 16, 3) and pack.lq.dtype == np.uint8
    assert pack.levels.shape == (6, 2, 3) and pack.levels.max() < 3
    assert list(pack.photo) == [0, 0, 0, 1, 1, 1]
    assert pack.photos == ("synthetic:0", "synthetic:1")
    assert (pack.size, pack.scale, len(pack)) == (64, 4, 6)
    assert pack.meta["lq_per_crop"] == 2
    assert abs(tiny_pack.stat().st_size - pack_bytes(6, 2, 64, 4)) < 4096
    assert pack.hq.std() > 10  # crops of the pictures, not blank
    again = load_pack(build_pack(_synthetic_photos(), tmp_path / "again.npz", crops_per_photo=3, lq_per_crop=2,
                                 size=64, scale=4, seed=0, log=None))
    np.testing.assert_array_equal(again.hq, pack.hq)
    np.testing.assert_array_equal(again.lq, pack.lq)
    np.testing.assert_array_equal(again.levels, pack.levels)


def test_pack_size_limit_is_enforced_before_building_and_when_loading(tiny_pack, tmp_path):
    from pure_lite.train.pack import PackError, build_pack, load_pack

    with pytest.raises(PackError, match="at most 1 crops per photo"):
        build_pack(_synthetic_photos(), tmp_path / "big.npz", crops_per_photo=3, lq_per_crop=2, size=64, scale=4,
                   max_bytes=66_048 + 3 * 13_834 + 100, log=None)  # room for 3 crops
    assert not (tmp_path / "big.npz").exists()
    with pytest.raises(PackError, match="over the"):
        load_pack(tiny_pack, max_bytes=10_000)


def test_malformed_packs_are_refused_with_the_reason(tiny_pack, tmp_path):
    from pure_lite.train.pack import PackError, load_pack

    with np.load(tiny_pack) as z:
        arrays = {k: z[k] for k in z.files}
    cases = {
        "no lq": {k: v for k, v in arrays.items() if k != "lq"},
        "hq must be uint8": {**arrays, "hq": arrays["hq"].astype(np.float32)},
        "levels must be": {**arrays, "levels": arrays["levels"] + 3},
        "pack format": {**arrays, "meta": np.array(json.dumps({**json.loads(str(arrays["meta"])), "format": 99}))},
    }
    for message, bad in cases.items():
        path = tmp_path / "bad.npz"
        np.savez(path, **bad)
        with pytest.raises(PackError, match=message):
            load_pack(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PackError, match="not a readable"):
        load_pack(tmp_path / "junk.npz")
    with pytest.raises(PackError, match="no such"):
        load_pack(tmp_path / "missing.npz")


def test_hq_batch_windows_come_from_the_pack(tiny_pack):
    from pure_lite.train.pack import PackError, hq_batch, load_pack

    pack = load_pack(tiny_pack)
    x = hq_batch(pack.hq, np.random.default_rng(0), 5, 32)
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.float32
    assert x.flags.c_contiguous  # a channels-last batch made the VQ's bf16 CPU convolutions ~3x slower
    assert -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x, hq_batch(pack.hq, np.random.default_rng(0), 5, 32))
    pixels = np.round((x + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)  # back to (n, 32, 32, 3)
    windows = np.lib.stride_tricks.sliding_window_view(pack.hq, (32, 32), axis=(1, 2))
    windows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 32, 32, 3)  # every window of every crop
    for w in pixels:  # each is a window of a pack crop, as it is or mirrored
        assert any((windows == v).all(axis=(1, 2, 3)).any() for v in (w, w[:, ::-1])), "not a window of the pack"
    with pytest.raises(PackError, match="larger"):
        hq_batch(pack.hq, np.random.default_rng(0), 1, 128)


# ----------------------------------------------------------------------------- the pack-only training run


def test_pack_training_runs_stops_at_its_deadline_and_resumes(tiny_pack, tmp_path):
    pytest.importorskip("transformers")
    from dataclasses import replace

    from pure_lite.checkpoint import CheckpointFiles, trained_image_size
    from pure_lite.train.config import TrainConfig, VQTrainConfig
    from pure_lite.train.pack_train import LMShape, PackTrainConfig, run

    config = PackTrainConfig(
        vq_base_channels=32, vq_z_channels=32, vq_codebook_size=64,
        vq_train=VQTrainConfig(steps=2, batch_size=2, crop=32, lr=1e-3, disc_weight=0.0, restart_every=0, log_every=1),
        lm=LMShape(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=512),
        lm_train=TrainConfig(lr=1e-3, max_steps=2, batch_size=2, warmup_steps=1, dropout=0.0, save_every=0, log_every=1),
    )
    logs: list[str] = []
    out = tmp_path / "run"
    expired = 1e-9  # minutes: the deadline has passed by the end of the first step
    assert run(tiny_pack, out, config, minutes=expired, device="cpu", log=logs.append) is None
    assert (out / "work" / "vq.ckpt").exists() and not (out / "model").exists()
    assert any("time is up at step 1/2" in m for m in logs)

    logs.clear()  # VQ resumes and finishes; the LM stops after its first step and publishes what it has
    assert run(tiny_pack, out, config, minutes=expired, device="cpu", publish_partial=True, log=logs.append) is None
    assert (out / "model-partial" / "config.json").exists() and (out / "vq" / "vq_ds8_c2i.pt").exists()
    assert trained_image_size(CheckpointFiles.locate(out / "model-partial").read_config()) == 64  # the pack's side
    assert any("resumed from" in m and "step 1" in m for m in logs)
    assert (out / "work" / "tokens" / "index.json").exists()
    assert (out / "work" / "lm" / "checkpoints" / "step-1").is_dir()

    logs.clear()  # a borrowed machine given only the VQ and the tokens (no pack) trains the LM from scratch
    carried = tmp_path / "carried"
    for part in ("vq", "tokens"):
        shutil.copytree(out / "work" / part, carried / part)
    elsewhere = run(tmp_path / "no-such-pack.npz", tmp_path / "elsewhere", config, device="cpu", work=carried,
                    log=logs.append)
    assert elsewhere is not None and CheckpointFiles.locate(elsewhere).vq.exists()
    assert trained_image_size(CheckpointFiles.locate(elsewhere).read_config()) == 64  # from the tokens, with no pack
    assert any("the pack is not read" in m for m in logs)

    logs.clear()  # the LM resumes from its checkpoint and the weights are written
    model = run(tiny_pack, out, replace(config), device="cpu", log=logs.append)
    assert model == out / "model" and any("resumed from" in m and "step 1" in m for m in logs)
    files = CheckpointFiles.locate(model)
    assert files.read_config()["hidden_size"] == 32 and files.vq.exists()
    assert trained_image_size(files.read_config()) == 64
    assert not (out / "work").exists() and not (model / "checkpoints").exists()
    assert (out / "vq" / "vq_ds8_c2i.pt").exists()
    import safetensors.torch
    shards = sorted(model.glob("*.safetensors"))
    assert shards and all(t.dtype == __import__("torch").bfloat16
                          for t in safetensors.torch.load_file(str(shards[0])).values())
    tokens_per_sample = 3 + 8 * 9 + 1  # an 64x64 image block: 8 rows of 8 codes + row ends, grids and bounds
    assert tokens_per_sample < 512


def test_tokens_only_stops_before_the_language_model_and_keeps_a_vq_it_finds(tiny_pack, tmp_path, capsys):
    """--tokens-only writes WORK/tokens (and no language model); run again on a work folder whose VQ is
    already there (v2's, say, for a bigger pack), it tokenizes with that VQ instead of training one."""
    pytest.importorskip("transformers")
    from pure_lite.train.pack import load_pack
    from pure_lite.train.pack_train import main
    from pure_lite.train.pretokenize import TokenDataset

    pack, work = load_pack(tiny_pack), tmp_path / "work"
    conversations = len(pack) * pack.lq.shape[1] * 2  # crops x LQ versions x flips
    args = [str(tiny_pack), str(tmp_path / "out"), "--vq-steps", "1", "--vq-batch", "2", "--work", str(work),
            "--tokens-only"]
    assert main(args) == 0
    assert len(TokenDataset(work / "tokens")) == conversations
    assert not (work / "lm").exists() and not (tmp_path / "out" / "model").exists()
    vq = (work / "vq" / "vq_ds8_c2i.pt").read_bytes()
    shutil.rmtree(work / "tokens")
    capsys.readouterr()
    assert main(args) == 0
    assert (work / "vq" / "vq_ds8_c2i.pt").read_bytes() == vq and "tokens ready" in capsys.readouterr().out
    assert len(TokenDataset(work / "tokens")) == conversations


def test_the_default_device_run_fits_the_shipped_size_limit():
    pytest.importorskip("torch")
    from pure_lite.train.pack_train import SHIPPED_LIMIT_BYTES, PackTrainConfig, shipped_bytes_estimate

    config = PackTrainConfig()
    vocab = 4 + 256 + 4 + 16 + config.vq_codebook_size
    assert shipped_bytes_estimate(config, vocab) <= SHIPPED_LIMIT_BYTES


def test_the_photo_list_in_the_docs_is_the_one_the_code_uses():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "pure-tiny-photos.md").read_text(encoding="utf-8")
    assert doc.endswith(ps.licence_table()), "regenerate docs/pure-tiny-photos.md (see its first lines)"


def test_vq_recipe_knobs_are_validated():
    from pure_lite.train.config import VQTrainConfig

    for bad in (dict(l2_weight=1.5), dict(min_lr_ratio=0.0), dict(steps=0), dict(crop=60)):
        with pytest.raises(ValueError):
            VQTrainConfig(**bad)


def test_pack_training_scores_the_heldout_pack_beside_it(tiny_pack, tmp_path):
    """heldout.npz beside the training pack becomes WORK/tokens-heldout, which the language model stage
    scores (here every step, and its starting weights) to keep its best step; without it the run says so and
    keeps the last. A later run may start its language model from this one's (``lm_from``), only over the same VQ."""
    pytest.importorskip("transformers")
    from dataclasses import replace

    from pure_lite.train.config import TrainConfig, VQTrainConfig
    from pure_lite.train.pack_train import LMShape, PackTrainConfig, run
    from pure_lite.train.pretokenize import TokenDataset

    config = PackTrainConfig(
        vq_base_channels=32, vq_z_channels=32, vq_codebook_size=64,
        vq_train=VQTrainConfig(steps=1, batch_size=2, crop=32, lr=1e-3, disc_weight=0.0, restart_every=0, log_every=1),
        lm=LMShape(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=512),
        lm_train=TrainConfig(lr=1e-3, max_steps=2, batch_size=2, warmup_steps=1, dropout=0.0, save_every=0,
                             log_every=1, eval_every=1),
    )
    packs = tmp_path / "pack"
    packs.mkdir()
    shutil.copyfile(tiny_pack, packs / "train.npz")
    logs: list[str] = []
    assert run(packs / "train.npz", tmp_path / "alone", config, device="cpu", log=logs.append) is not None
    assert any("no held-out pack" in m for m in logs) and not any("held-out loss" in m for m in logs)

    shutil.copyfile(tiny_pack, packs / "heldout.npz")  # stands in for the held-out crops
    logs.clear()
    work = tmp_path / "work"
    assert run(packs / "train.npz", tmp_path / "run", config, device="cpu", work=work, keep_work=True,
               log=logs.append) is not None
    assert len(TokenDataset(work / "tokens-heldout")) == len(TokenDataset(work / "tokens")) > 0
    assert [m.split()[1] for m in logs if "held-out loss" in m] == ["0", "1", "2"]  # 0: the starting weights

    # another run starts its language model from this one's (v3 from v2.2): the same weights at step 0
    import safetensors.torch
    import torch

    from pure_lite.errors import PureLiteError

    again = tmp_path / "again"
    for part in ("vq", "tokens", "tokens-heldout"):
        shutil.copytree(work / part, again / part)
    trained = tmp_path / "run" / "model"
    assert run(None, tmp_path / "next", replace(config, lm_from=str(trained)), device="cpu", work=again,
               keep_work=True, log=None) is not None

    def weights(folder):
        return {k: v for f in sorted(folder.glob("model*.safetensors"))
                for k, v in safetensors.torch.load_file(str(f)).items()}

    start, source = weights(again / "init"), weights(trained)
    assert start.keys() == source.keys() and all(torch.equal(start[k], source[k]) for k in source)
    assert (again / "init" / "vq_ds8_c2i.pt").read_bytes() == (work / "vq" / "vq_ds8_c2i.pt").read_bytes()

    from pure_lite.checkpoint import load_vq_state_dict
    from pure_lite.train.pack_train import _copy_trained_lm

    def with_vq(folder, part, change):  # FOLDER's VQ file with one tensor of PART changed
        state = load_vq_state_dict(folder / "vq_ds8_c2i.pt")
        name = next(k for k in state if k.startswith(part))
        state[name] = state[name] + change
        torch.save({"model": state}, folder / "vq_ds8_c2i.pt")

    other = tmp_path / "other"  # a work folder whose tokens came from another VQ: its codebook differs
    shutil.copytree(again, other, ignore=shutil.ignore_patterns("init", "lm"))
    with_vq(other / "vq", "quantize.", 0.5)
    with pytest.raises(PureLiteError, match="another tokenizer"):
        run(None, tmp_path / "refused", replace(config, lm_from=str(trained)), device="cpu", work=other, log=None)
    assert not (other / "init").exists()

    tuned = tmp_path / "tuned"  # the same model after decoder_tune: other decoder weights, the same codes
    shutil.copytree(trained, tuned)
    with_vq(tuned, "decoder.", 0.5)
    _copy_trained_lm(tuned, work / "vq" / "vq_ds8_c2i.pt", tmp_path / "init-from-tuned")
    assert weights(tmp_path / "init-from-tuned").keys() == source.keys()


def test_an_unfinished_run_publishes_its_best_heldout_step(tmp_path):
    """--publish-partial writes the weights a finished run would return: the best held-out step's when
    held-out conversations were scored, else the latest checkpoint's."""
    import json

    from pure_lite.train.finetune import weights_so_far

    checkpoints = tmp_path / "checkpoints"
    assert weights_so_far(checkpoints) is None
    for step in (100, 200, 300):
        (checkpoints / f"step-{step}").mkdir(parents=True)
    assert weights_so_far(checkpoints) == (checkpoints / "step-300" / "trainable.safetensors", "step-300")
    (checkpoints / "best").mkdir()
    (checkpoints / "best" / "state.json").write_text(json.dumps({"step": 200, "loss": 3.9}))
    weights, label = weights_so_far(checkpoints)
    assert weights == checkpoints / "best" / "trainable.safetensors" and label.endswith("200")
