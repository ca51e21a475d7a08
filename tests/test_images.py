import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pure_lite import images
from pure_lite.errors import InvalidImageError


def _png_header_only(width, height):
    """A PNG whose header declares width x height pixels, with no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_not_an_image(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        images.load_image(p)


def test_truncated_png(tmp_path, rgb_image):
    p = tmp_path / "t.png"
    Image.fromarray(rgb_image).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError):
        images.load_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot read"):
        images.load_image(tmp_path / "missing.png")


def test_zero_size():
    with pytest.raises(InvalidImageError, match="zero size"):
        images.load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InvalidImageError, match="zero size"):
        images.load_image(Image.new("RGB", (0, 5)))


def test_huge_declared_size_refused_quickly(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(InvalidImageError, match="exceeds|too large"):
        images.load_image(p)


def test_16_bit_greyscale(tmp_path):
    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    out = images.load_image(p)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], arr / 65535.0, atol=1e-6)
    np.testing.assert_allclose(images.load_image(arr), out, atol=1e-6)


def test_greyscale_palette_and_rgba():
    grey = Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L")
    np.testing.assert_allclose(images.load_image(grey), 128 / 255, atol=1e-6)
    pal = Image.new("P", (4, 4))
    pal.putpalette([10, 20, 30] * 256)
    np.testing.assert_allclose(images.load_image(pal)[0, 0], np.array([10, 20, 30]) / 255, atol=1e-6)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 0  # fully transparent red -> white
    np.testing.assert_allclose(images.load_image(Image.fromarray(rgba, "RGBA")), 1.0)
    rgba[..., 3] = 255
    np.testing.assert_allclose(images.load_image(rgba)[..., 0], 1.0)
    np.testing.assert_allclose(images.load_image(rgba)[..., 1], 0.0)


def test_bad_arrays():
    with pytest.raises(InvalidImageError):
        images.load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidImageError):
        images.load_image(np.full((4, 4, 3), 2.0))
    with pytest.raises(InvalidImageError):
        images.load_image(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(InvalidImageError):
        images.load_image(12)


def test_color_fix_takes_low_frequencies_of_reference():
    rng = np.random.default_rng(0)
    out = rng.random((64, 64, 3)).astype(np.float32)
    ref = np.full((64, 64, 3), 0.3, np.float32)
    fixed = images.color_fix(out, ref)
    assert abs(fixed.mean() - 0.3) < 0.02  # mean follows the reference
    # high frequencies of the output survive
    hf_out = out - images.low_frequencies(out)
    hf_fixed = fixed - images.low_frequencies(fixed)
    assert np.corrcoef(hf_out.ravel(), hf_fixed.ravel())[0, 1] > 0.9


def test_atomic_save_leaves_no_partial(tmp_path):
    img = Image.new("RGB", (8, 8))
    images.save_image_atomic(img, tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with pytest.raises(InvalidImageError):
        images.save_image_atomic(img, tmp_path / "a.unknownext")


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the test; the old one is put back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_save_gives_the_mode_of_a_plain_write(tmp_path, umask, mask, mode):
    umask(mask)
    images.save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    with open(tmp_path / "plain", "w"):
        pass
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == mode == (tmp_path / "plain").stat().st_mode & 0o777


def test_atomic_save_never_replaces_without_overwrite(tmp_path):
    from pure_lite.errors import OutputError

    target = tmp_path / "a.png"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        images.save_image_atomic(Image.new("RGB", (8, 8)), target, overwrite=False)
    assert target.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["a.png"]
    images.save_image_atomic(Image.new("RGB", (8, 8)), target)
    assert Image.open(target).size == (8, 8)


def test_atomic_save_reports_unwritable_places_as_output_errors(tmp_path):
    from pure_lite.errors import OutputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        images.save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "file" / "sub" / "a.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(OutputError, match="folder.png"):
        images.save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "folder.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png"]


def test_an_output_without_suffix_is_png(tmp_path):
    images.save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "noext")
    assert Image.open(tmp_path / "noext").format == "PNG"
