import numpy as np
import pytest

from pure_lite.evaluate import UNAVAILABLE, evaluate, psnr, ssim, write_report

skimage_metrics = pytest.importorskip("skimage.metrics", reason="install the [test] extra")


def _pair():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64] / 64.0
    a = np.stack([x, y, x * y], axis=2).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    return a, b


def test_psnr_and_ssim_agree_with_scikit_image():
    a, b = _pair()
    assert psnr(a, b) == pytest.approx(skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-6)
    ref = skimage_metrics.structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False)
    assert ssim(a, b) == pytest.approx(ref, abs=2e-3)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)


def test_eval_reports_unavailable_metrics_as_unavailable(tiny_compact, tmp_path):
    from PIL import Image

    from pure_lite import Restorer

    a, _ = _pair()
    path = tmp_path / "card.png"
    Image.fromarray((a * 255).astype(np.uint8)).save(path)
    # whole: one 64 square (this checkpoint records no side, so its tiles would be PURE's 512)
    report = evaluate(Restorer.from_pretrained(tiny_compact), [path], size=64, scale=2, seed=3, model="tiny-model",
                      whole=True)
    assert report.unavailable == UNAVAILABLE
    assert "lpips" not in report.mean and np.isfinite(report.mean["bicubic_psnr"])
    assert set(report.degradation_accuracy) == {"noise", "blur", "jpeg"}
    json_path, md_path = write_report(report, tmp_path / "report")
    assert "unavailable" in md_path.read_text() and json_path.exists()
    # the report says what it measured
    import json

    saved = json.loads(json_path.read_text())
    assert {k: saved[k] for k in ("model", "size", "scale", "seed")} == {"model": "tiny-model", "size": 64,
                                                                         "scale": 2, "seed": 3}
    assert saved["backend"].startswith("torch (cpu")
    assert md_path.read_text().startswith("Model: tiny-model (torch (cpu, float32)); HQ side 64 px, degraded x2, restored as one square, seed 3")


def test_eval_reports_lpips_when_a_metric_is_given(tiny_compact, tmp_path):
    from PIL import Image

    from pure_lite import Restorer

    a, _ = _pair()
    path = tmp_path / "card.png"
    Image.fromarray((a * 255).astype(np.uint8)).save(path)
    calls = []

    def fake_lpips(x, y):
        calls.append(x.shape)
        return float(np.abs(x - y).mean())

    report = evaluate(Restorer.from_pretrained(tiny_compact), [path], size=64, scale=2, seed=0, lpips=fake_lpips,
                      whole=True)
    assert calls == [(64, 64, 3), (64, 64, 3)]  # the restoration and the bicubic upscale
    assert "lpips" not in report.unavailable and "niqe" in report.unavailable
    assert report.mean["lpips"] == pytest.approx(report.images[0]["lpips"])
    assert report.images[0]["bicubic_lpips"] != report.images[0]["lpips"]
    assert "LPIPS" in report.markdown()


def test_eval_restores_in_tiles_of_the_models_side_as_restore_does(tiny_compact, tmp_path):
    """A crop larger than the model's side is restored in tiles, as `restore` would do it, not as one square
    beyond the side the model was trained at (which is refused when asked for with whole=True)."""
    import dataclasses

    from PIL import Image

    from pure_lite import Restorer, SamplingConfig

    a, _ = _pair()
    path = tmp_path / "card.png"
    Image.fromarray((a * 255).astype(np.uint8)).save(path)
    loaded = Restorer.from_pretrained(tiny_compact)
    # the same weights, taken to be trained at 32 px and x2: tiles of 4 x 4 codes keep this cheap
    restorer = Restorer(dataclasses.replace(loaded.components, image_size=32, trained_scale=2))
    results = []
    restore = restorer.restore
    restorer.restore = lambda *args, **kwargs: results.append(restore(*args, **kwargs)) or results[-1]
    fast = SamplingConfig(max_text_tokens=2)
    report = evaluate(restorer, [path], size=64, scale=2, seed=0, sampling=fast)
    assert results[0].image.size == (64, 64) and len(results[0].tiles) == 9  # 3 x 3 tiles of 32 px over 64 px
    assert report.setup["restored_as"] == "in tiles of 32 px" and "restored in tiles of 32 px" in report.markdown()
    with pytest.raises(ValueError, match="target_size 64 is above the 32x32 squares"):
        evaluate(restorer, [path], size=64, scale=2, seed=0, sampling=fast, whole=True)
