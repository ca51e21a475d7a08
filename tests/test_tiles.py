"""Photos of any size and shape: the tile plan, blending, and tiled restoration end to end."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pure_lite import InvalidImageError, Restorer, SamplingConfig, images
from pure_lite.tiles import Canvas, TilePlan, axis_starts

TILE = 64  # the tiny checkpoint restored with 64-pixel tiles: 8 x 8 codes each
GREEDY = SamplingConfig(temperature=0, max_text_tokens=3)


@pytest.mark.parametrize("width, height, tile", [(1200, 800, 128), (300, 200, 64), (128, 130, 128), (5000, 129, 512)])
def test_plan_covers_the_canvas_with_enough_overlap(width, height, tile):
    plan = TilePlan.cover(width, height, tile)
    assert plan.canvas == (max(width, tile), max(height, tile))
    covered = np.zeros(plan.canvas[::-1], bool)
    for x0, y0, x1, y1 in plan.boxes:
        assert (x1 - x0, y1 - y0) == (tile, tile) and x0 >= 0 and y0 >= 0
        assert x1 <= plan.canvas[0] and y1 <= plan.canvas[1]
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for starts in (axis_starts(plan.canvas[0], tile, tile // 4), axis_starts(plan.canvas[1], tile, tile // 4)):
        gaps = np.diff(starts)
        assert (gaps <= tile - tile // 4).all()  # neighbours overlap by at least a quarter tile


def test_blend_is_exact_for_equal_tiles_and_seamless_between_different_ones():
    plan = TilePlan.cover(200, 64, 64)
    canvas = Canvas(plan, 8)
    for i, box in enumerate(plan.boxes):
        canvas.add(box, np.full((64, 64, 3), 0.25 + 0.5 * (i % 2), np.float32), np.full((8, 8), float(i), np.float32))
    pixels, entropy = canvas.result()
    assert pixels.shape == (64, 200, 3) and entropy.shape == (8, 25)
    row = pixels[32, :, 0]
    assert row[0] == pytest.approx(0.25) and row[-1] == pytest.approx(0.75 if len(plan.boxes) % 2 == 0 else 0.25)
    assert np.abs(np.diff(row)).max() <= 0.5 / (64 // 4) + 1e-6  # a linear ramp over the overlap, no step

    flat = Canvas(plan, 8)
    for box in plan.boxes:
        flat.add(box, np.full((64, 64, 3), 0.6, np.float32), np.ones((8, 8), np.float32))
    np.testing.assert_allclose(flat.result()[0], 0.6, atol=1e-6)


@pytest.fixture(scope="module")
def tiled(tiny_compact):
    """The tiny torch checkpoint, restoring 64-pixel tiles."""
    r = Restorer.from_pretrained(tiny_compact)
    return Restorer(dataclasses.replace(r.components, image_size=TILE))


def test_scale_keeps_the_aspect_ratio(tiled):
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    res = tiled.restore(img, seed=0, sampling=GREEDY, scale=4)
    assert res.image.size == (120, 80)
    assert len(res.tiles) == 6 and res.timings["tiles"] == 6
    assert res.entropy.shape == (10, 15)
    assert res.tiles[0].box == (0, 0, 64, 64) and res.tiles[-1].box[2:] == (120, 80)
    # greedy: the tiles' codes do not depend on how many were decoded together
    one_by_one = tiled.restore(img, seed=0, sampling=GREEDY, scale=4, tile_batch=1)
    for a, b in zip(res.tiles, one_by_one.tiles):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.array_equal(np.asarray(res.image), np.asarray(one_by_one.image))


def test_tiny_input_gives_a_tiny_output(tiled):
    res = tiled.restore(np.zeros((1, 1, 3), np.uint8), seed=0, sampling=GREEDY, scale=4)
    assert res.image.size == (4, 4) and len(res.tiles) == 1 and res.entropy.shape == (1, 1)


def test_square_mode_is_still_there(tiled):
    img = np.zeros((20, 30, 3), np.uint8)
    assert tiled.restore(img, seed=0, sampling=GREEDY, target_size=TILE).image.size == (TILE, TILE)


def test_output_beyond_the_pixel_limit_is_refused_before_reading_pixels(tiled, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(path)

    def never(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(images, "load_photo", never)
    with pytest.raises(InvalidImageError, match="pixel limit"):
        tiled.restore(path, scale=4)
    with pytest.raises(ValueError, match="scale"):
        tiled.restore(path, scale=0)
    with pytest.raises(ValueError, match="tile_batch"):
        tiled.restore(path, tile_batch=0)


def test_large_jpeg_is_decoded_reduced_for_a_small_square(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray((np.random.default_rng(0).random((1500, 2000, 3)) * 255).astype(np.uint8)).save(path, quality=80)
    full = images.load_image(path)
    small = images.load_image(path, reduce_to=(128, 128))
    assert full.shape == (1500, 2000, 3)
    assert 128 <= small.shape[0] <= 1500 // 4 and 128 <= small.shape[1] <= 2000 // 4


def test_flat_photo_has_no_seams_and_no_colour_drift():
    """PURE-tiny at scale 1 over a 500 x 375 flat photo: 20 tiles; every 128-pixel block keeps the colour."""
    colour = np.array([180, 120, 60], np.uint8)
    flat = np.broadcast_to(colour, (375, 500, 3)).copy()
    with pytest.warns(UserWarning, match="scale 1 is below the x4 this model was trained for"):
        res = Restorer.from_pretrained().restore(flat, seed=0, scale=1, tile_batch=8,
                                                 sampling=SamplingConfig(max_text_tokens=8))
    out = np.asarray(res.image, np.float64)
    assert out.shape == (375, 500, 3) and len(res.tiles) == 20
    for y in range(0, 375, 128):
        for x in range(0, 500, 128):
            block = out[y:y + 128, x:x + 128].reshape(-1, 3).mean(axis=0)
            assert np.abs(block - colour).max() <= 4, (y, x, block)


def test_cli_scale_on_a_non_square_photo(tmp_path):
    src, dst = tmp_path / "photo.png", tmp_path / "restored.png"
    Image.fromarray((np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)).save(src)
    run = subprocess.run([sys.executable, "-m", "pure_lite.cli", "restore", str(src), "-o", str(dst), "--scale", "2",
                          "--seed", "0", "--max-text-tokens", "4", "--jacobi-window", "8", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert Image.open(dst).size == (80, 60)
