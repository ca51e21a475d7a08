import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pure_lite import images
from pure_lite.errors import InvalidImageError, OutputError


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


# What a photo has besides colour (issue 38) and where it is upright (issue 34 group 8): kept through load and save.

def _srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _gradient(width: int, height: int) -> np.ndarray:
    """A smooth, distinct-valued colour image (uint8) whose orientation is visible in every pixel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], 2).astype(np.uint8)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_on_load(tmp_path, orientation):
    """A file stored turned, with the EXIF tag a phone writes, loads as a viewer shows it (16 wide, 32 tall)."""
    upright = Image.fromarray(_gradient(16, 32))
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = upright.transpose(undo)  # what exif_transpose turns back: 6 -> ROTATE_270, 8 -> ROTATE_90
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    assert images.image_size(path) == (16, 32)
    rgb, _ = images.load_photo(path)
    np.testing.assert_array_equal(np.rint(rgb * 255).astype(np.uint8), np.asarray(upright))
    assert images.load_photo(path.read_bytes())[0].shape == (32, 16, 3)  # bytes, as restore-many's workers get


def test_exif_orientation_and_reduced_decoding_agree(tmp_path):
    """reduce_to is upright; the box-reduction happens on the stored (turned) pixels, never below that size."""
    stored = Image.fromarray(_gradient(128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    rgb = images.load_image(path, reduce_to=(16, 32))
    assert rgb.shape == (32, 16, 3)


def test_rgba_keeps_its_colour_and_its_alpha_is_upscaled_bicubic(tmp_path):
    y, x = np.mgrid[0:12, 0:16]
    alpha = ((x + y) * 255 // 26).astype(np.uint8)[..., None]  # smooth: no overshoot for Pillow's 8-bit passes to clip
    rgba = np.concatenate([_gradient(16, 12), alpha], 2)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    rgb, traits = images.load_photo(path)
    np.testing.assert_array_equal(np.rint(rgb * 255).astype(np.uint8), rgba[..., :3])  # not blended onto white
    assert traits.alpha.shape == (12, 16) and not traits.grey
    out = images.to_pil(images.resize(rgb, 64, 48), traits)
    assert out.mode == "RGBA" and out.size == (64, 48)
    # Pillow's own bicubic resize of the 8-bit alpha, an independent path: rounding apart, the same
    expected = np.asarray(Image.fromarray(rgba[..., 3]).resize((64, 48), Image.BICUBIC), np.int16)
    assert np.abs(np.asarray(out)[..., 3].astype(np.int16) - expected).max() <= 1
    images.save_image_atomic(out, tmp_path / "a_out.png")
    assert Image.open(tmp_path / "a_out.png").mode == "RGBA"
    images.save_image_atomic(out, tmp_path / "a_out.jpg")  # JPEG has no alpha: blended onto white there
    assert Image.open(tmp_path / "a_out.jpg").mode == "RGB"
    # load_image (training, eval) still blends onto white
    blended = images.load_image(path)
    np.testing.assert_allclose(blended, rgb * traits.alpha[..., None] + 1 - traits.alpha[..., None], atol=1e-6)


def test_grey_in_grey_out_without_a_tint(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(_gradient(16, 12)[..., 0]).save(path)
    rgb, traits = images.load_photo(path)
    assert traits.grey and not traits.sixteen_bit
    tinted = np.clip(rgb + np.array([0.03, -0.02, 0.01], np.float32), 0, 1)  # what a restoration may leave
    out = images.to_pil(tinted, traits)
    assert out.mode == "L"
    np.testing.assert_allclose(np.asarray(out, np.float32) / 255, tinted @ images.LUMA, atol=0.5 / 255 + 1e-6)


def test_sixteen_bit_grey_stays_sixteen_bit_without_8_bit_steps(tmp_path):
    """A 16-bit gradient over 1/16 of the range: 8 bits would leave 16 levels (bands); 16 bits keep them all."""
    ramp = (20000 + np.arange(64 * 64).reshape(64, 64)).astype(np.uint16)  # 4096 levels, one apart
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    rgb, traits = images.load_photo(path)
    assert traits.grey and traits.sixteen_bit
    out = images.to_pil(rgb, traits)
    assert out.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(out), ramp)
    images.save_image_atomic(out, tmp_path / "out.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), ramp)
    images.save_image_atomic(out, tmp_path / "out.jpg")  # JPEG holds 8 bits: the nearest 8-bit grey
    assert Image.open(tmp_path / "out.jpg").mode == "L"


def test_icc_profile_is_carried_to_every_output_format(tmp_path):
    icc = _srgb_profile()
    path = tmp_path / "p.png"
    Image.fromarray(_gradient(16, 12)).save(path, icc_profile=icc)
    rgb, traits = images.load_photo(path)
    assert traits.icc_profile == icc
    out = images.to_pil(rgb, traits)
    for name in ("o.png", "o.jpg", "o.webp", "o.tif"):
        images.save_image_atomic(out, tmp_path / name)
        assert Image.open(tmp_path / name).info.get("icc_profile") == icc, name


def test_quality_applies_to_lossy_outputs_only(tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    images.save_image_atomic(img, tmp_path / "low.jpg", quality=10)
    images.save_image_atomic(img, tmp_path / "high.jpg", quality=95)
    assert (tmp_path / "low.jpg").stat().st_size < (tmp_path / "high.jpg").stat().st_size / 2
    images.save_image_atomic(img, tmp_path / "low.webp", quality=10)
    images.save_image_atomic(img, tmp_path / "high.webp", quality=95)
    assert (tmp_path / "low.webp").stat().st_size < (tmp_path / "high.webp").stat().st_size
    with pytest.raises(OutputError, match="lossy"):
        images.save_image_atomic(img, tmp_path / "x.png", quality=90)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(InvalidImageError, match=r"\.xyz.*use \.png"):
        images.check_output(tmp_path / "x.xyz")


def _finishes(fn, seconds: float = 10.0):
    """fn's exception (or None) if it returns within ``seconds``; fails the test if it blocks (a daemon thread,
    so a hang cannot keep the test run alive)."""
    import threading

    outcome = []

    def run():
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{fn} blocked for {seconds} s"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_input_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for call in (lambda: images.load_image(fifo), lambda: images.image_size(fifo)):
        error = _finishes(call)
        assert isinstance(error, InvalidImageError) and "FIFO" in str(error), error
