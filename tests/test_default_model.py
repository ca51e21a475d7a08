"""The shipped default model, PURE-tiny (an int8 ONNX export inside the package)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure_lite import Restorer
from pure_lite.manifest import Manifest
from pure_lite.prompt import parse_degradation_levels
from pure_lite.restorer import DEFAULT_MODEL

pytest.importorskip("onnxruntime", reason="the default model runs on the runtime: install the [runtime] extra")

EXAMPLE = Path(__file__).parents[1] / "examples" / "images" / "example.png"


def test_shipped_manifest_checksums_verify_and_size_is_within_budget():
    manifest = Manifest.load(DEFAULT_MODEL, verify_checksums=True)
    assert manifest.quantization == "int8"
    assert manifest.model["image_size"] == 128
    total = sum(entry["bytes"] for entry in manifest.data["files"].values())
    assert total <= 25 * 1024 * 1024, f"the default model grew to {total / 2**20:.1f} MiB (budget 25 MiB)"


@pytest.fixture(scope="module")
def default_restorer():
    return Restorer.from_pretrained()


def test_default_restore_is_deterministic_per_seed(default_restorer):
    lq = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    a = default_restorer.restore(lq, seed=0)
    b = default_restorer.restore(lq, seed=0)
    assert a.image.size == (128, 128)  # the model's own size, from its manifest
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    # A trained model answers in the training template: every degradation type gets a level.
    assert set(parse_degradation_levels(a.degradation)) == {"noise", "blur", "jpeg"}, a.text


def test_a_flat_input_still_restores_and_the_card_says_where_its_text_breaks(default_restorer):
    """docs/pure-tiny.md: on flat inputs (one colour, e.g. a 1x1 image) PURE-tiny writes the sentence for some
    colours (white) and garbles it for others (pure green); the image is still restored, and levels it failed
    to write are not made up."""
    card = (Path(__file__).parents[1] / "docs" / "pure-tiny.md").read_text()
    assert "always writes a well-formed sentence" not in card and "1×1" in card and "pure green" in card
    levels = {}
    for name, pixel in (("white", [255, 255, 255]), ("green", [0, 255, 0])):
        result = default_restorer.restore(np.array([[pixel]], dtype=np.uint8), seed=0)
        assert result.image.size == (4, 4)  # x4; its one tile is the pixel stretched to 128 x 128
        levels[name] = parse_degradation_levels(result.degradation)
        assert set(levels[name]) <= {"noise", "blur", "jpeg"}, result.text
    assert set(levels["white"]) == {"noise", "blur", "jpeg"} and set(levels["green"]) != {"noise", "blur", "jpeg"}


def test_cli_without_model_uses_the_default_and_says_so(tmp_path, capsys):
    from pure_lite.cli import main

    out = tmp_path / "restored.png"
    assert main(["restore", str(EXAMPLE), "-o", str(out), "--seed", "0"]) == 0  # not -q: that hides the notice
    assert "PURE-tiny" in capsys.readouterr().err
    assert Image.open(out).size == (128, 128)


def test_eval_command_defaults_to_pure_tiny_and_held_out_photos(tmp_path, monkeypatch):
    pytest.importorskip("skimage", reason="the default evaluation photos ship with scikit-image")
    import json

    from pure_lite.cli import main

    monkeypatch.setenv("PURE_LITE_LPIPS_WEIGHTS", str(tmp_path / "no-weights.safetensors"))
    assert main(["eval", "-o", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in report["images"]] == ["chelsea.png", "coffee.png"]
    assert "lpips" in report["unavailable"] and "lpips" not in report["mean"]
    assert 5 < report["mean"]["psnr"] < 60 and 5 < report["mean"]["bicubic_psnr"] < 60
