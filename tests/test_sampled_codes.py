"""Sampled codes (what the language model gives the decoder) and decoder_tune --codes, which trains on them."""

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import random_lpips_weights  # noqa: E402

from pure_lite.errors import PureLiteError  # noqa: E402


def _pack(path, n: int = 5, side: int = 32):
    """A minimal training pack (format 1) with two LQ versions per crop."""
    rng = np.random.default_rng(0)
    small = rng.random((n, side // 8, side // 8, 3))
    hq = (np.clip(small.repeat(8, 1).repeat(8, 2) + rng.normal(0, 0.03, (n, side, side, 3)), 0, 1) * 255).round()
    hq = hq.astype(np.uint8)
    lq = np.stack([hq[:, ::4, ::4], hq[:, 1::4, 1::4]], axis=1)
    np.savez(path, hq=hq, lq=lq, levels=np.zeros((n, 2, 3), np.uint8), photo=np.zeros(n, np.int32),
             photos=np.array(["synthetic:0"]), meta=np.array(json.dumps({"format": 1})))
    return path


def test_prompts_are_the_ones_restore_builds(tiny_pure, tmp_path):
    from pure_lite.restorer import Restorer
    from pure_lite.train.pack import load_pack
    from pure_lite.train.sampled_codes import lq_prompts

    restorer = Restorer.from_pretrained(tiny_pure)
    lq = load_pack(_pack(tmp_path / "p.npz")).lq[:2, 1]
    prompts = lq_prompts(restorer.components, lq, 32)
    for x, prompt in zip(lq, prompts):
        expected = restorer.restore(x, seed=0, target_size=32, color_fix=False).prompt_tokens
        np.testing.assert_array_equal(prompt, expected)


def test_sampled_codes_do_not_depend_on_batch_or_on_stopping(tiny_pure, tmp_path):
    from pure_lite.train.sampled_codes import sample_pack_codes, visit_order

    pack = _pack(tmp_path / "p.npz")
    whole = sample_pack_codes(tiny_pure, pack, tmp_path / "whole.npz", batch=4, log=None)
    assert sample_pack_codes(tiny_pure, pack, tmp_path / "part.npz", limit=2, batch=1, log=None) is not None
    resumed = sample_pack_codes(tiny_pure, pack, tmp_path / "part.npz", batch=1, log=None)
    with np.load(whole) as a, np.load(resumed) as b:
        for name in ("index", "version", "codes"):
            np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a["index"], visit_order(5, 0))
        np.testing.assert_array_equal(a["version"], a["index"] % 2)
        assert a["codes"].shape == (5, 4, 4) and a["codes"].min() >= 0
        assert len({c.tobytes() for c in a["codes"]}) > 1  # the crops were restored, not one answer copied
    with pytest.raises(PureLiteError, match="other settings"):
        sample_pack_codes(tiny_pure, pack, tmp_path / "part.npz", seed=1, log=None)


def test_given_codes_are_the_ones_decoded(tiny_pure):
    from pure_lite.checkpoint import CheckpointFiles, load_vq_state_dict
    from pure_lite.torch_backend.vq import VQConfig, VQModel
    from pure_lite.train.vq_train import vq_losses

    state = load_vq_state_dict(CheckpointFiles.locate(tiny_pure).vq)
    vq = VQModel(VQConfig.from_state_dict(state)).eval()
    vq.load_state_dict(state)
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, vq.config.codebook_size, (2, 4, 4)))
    pixels = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        recon, rec, vql = vq_losses(vq, pixels, 0.25, frozen_codes=True, codes=codes)
        np.testing.assert_allclose(recon.clamp(-1, 1).numpy(), vq.decode(codes).numpy(), rtol=0, atol=1e-6)
        assert float(rec) == pytest.approx(float(recon.abs().mean()), rel=1e-6) and float(vql) == 0
    with pytest.raises(ValueError, match="frozen_codes"):
        vq_losses(vq, pixels, 0.25, codes=codes)


def test_decoder_tune_trains_on_sampled_codes(tiny_pure, tmp_path):
    from pure_lite.checkpoint import CheckpointFiles, load_vq_state_dict
    from pure_lite.train.decoder_tune import DEFAULT_CONFIG, coded_batch, same_codes, tune_decoder
    from pure_lite.train.pack import load_pack
    from pure_lite.train.perceptual import PerceptualLoss
    from pure_lite.train.sampled_codes import load_sampled_codes, sample_pack_codes

    pack = _pack(tmp_path / "p.npz")
    sampled = sample_pack_codes(tiny_pure, pack, tmp_path / "codes.npz", limit=4, log=None)
    hq = load_pack(pack).hq
    index, codes = load_sampled_codes(sampled, len(hq), 32)
    pick = np.random.default_rng(7).integers(len(index), size=3)
    pixels, got = coded_batch(hq, index, codes, np.random.default_rng(7), 3, 32)
    np.testing.assert_array_equal(got, codes[pick])
    np.testing.assert_allclose((pixels + 1) * 127.5, hq[index[pick]].transpose(0, 3, 1, 2), atol=1e-4)
    with pytest.raises(ValueError, match="whole 32-pixel crops"):
        coded_batch(hq, index, codes, np.random.default_rng(0), 3, 16)

    config = replace(DEFAULT_CONFIG, steps=2, batch_size=2, crop=32, lr=1e-2, warmup_steps=0, save_every=0)
    logs: list[str] = []
    out = tune_decoder(tiny_pure, pack, tmp_path / "work", config, codes=sampled, device="cpu",
                       perceptual=PerceptualLoss(random_lpips_weights("alexnet"), "alexnet"), log=logs.append)
    assert any("sampled codes of 4 crops" in m for m in logs)
    old, new = load_vq_state_dict(CheckpointFiles.locate(tiny_pure).vq), load_vq_state_dict(CheckpointFiles.locate(out).vq)
    assert same_codes(old, new) and any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))

    np.savez(tmp_path / "bad.npz", index=np.array([0, 9]), codes=np.zeros((2, 4, 4), np.int16))
    with pytest.raises(PureLiteError, match="does not index"):
        load_sampled_codes(tmp_path / "bad.npz", len(hq), 32)
    np.savez(tmp_path / "small.npz", index=np.array([0, 1]), codes=np.zeros((2, 2, 2), np.int16))
    with pytest.raises(PureLiteError, match="codes per crop"):
        tune_decoder(tiny_pure, pack, tmp_path / "work2", config, codes=tmp_path / "small.npz", device="cpu", log=None)


def test_command_line_errors_are_one_line(tiny_pure, tmp_path, capsys):
    from pure_lite.train import decoder_tune, sampled_codes

    assert sampled_codes.main([str(tiny_pure), str(tmp_path / "absent.npz"), str(tmp_path / "codes.npz")]) == 2
    assert decoder_tune.main([str(tiny_pure), str(_pack(tmp_path / "p.npz")), str(tmp_path / "work"),
                              "--codes", str(tmp_path / "absent-codes.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
    assert "absent.npz" in err[0] and "absent-codes.npz" in err[1]
    assert not (tmp_path / "codes.npz").exists()
