"""Image input and output (docs/pure-format.md §3): safe loading and conversion, resizing, the wavelet colour fix.

Everything here is NumPy + Pillow so the torch backend and the torch-free runtime share it.
Pixels travel as float32 H x W x 3 arrays in [0, 1] between these functions. The model restores
colour only; what else a photo has (an alpha channel, being grey, 16 bits per sample, a colour
profile) is recorded on load as ``PhotoTraits`` and put back on the output by ``to_pil``. Files are
turned upright on load as their EXIF orientation says, as a viewer shows them.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .atomic import atomic_path
from .errors import InvalidImageError, OutputError
from .regular_files import open_regular

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # bytes: an encoded file's content

MAX_PIXELS = 64 * 1024 * 1024  # refuse to decode anything larger (decompression bombs)
COLOR_FIX_LEVELS = 5


LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's convert("L")
SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}  # where a 16-bit grey output stays 16-bit
LOSSY_FORMATS = {"JPEG", "WEBP"}  # where ``quality`` applies
_ICC_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "RGB", "RGBA", "RGBa", "RGBX", "P", "PA"}
# What a format holds of the output modes; the rest is converted (to_format_mode). Others: L and RGB.
_FORMAT_MODES = {"PNG": {"L", "LA", "I;16", "RGB", "RGBA"}, "TIFF": {"L", "LA", "I;16", "RGB", "RGBA"},
                 "WEBP": {"RGB", "RGBA"}, "BMP": {"L", "RGB", "RGBA"}, "JPEG": {"L", "RGB"}}


@dataclass(frozen=True, eq=False)
class PhotoTraits:
    """What an input has that the restoration does not carry (it restores colour, in float, opaque):
    recorded on load, put back on the output by ``to_pil`` (grey in, grey out; alpha kept; 16 bits kept)."""

    grey: bool = False  # L, LA, 1-bit, 16-bit grey, a 2-D array: the output is grey too
    sixteen_bit: bool = False  # 16-bit grey in: 16-bit grey out (PNG, TIFF)
    alpha: np.ndarray | None = None  # H x W float32 in [0, 1] at the decoded input's size; upscaled bicubic
    icc_profile: bytes | None = None  # the input's colour profile, embedded in the output


def _blend_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite float RGB in [0, 1] over white with alpha in [0, 1] (what ``load_image`` gives for RGBA)."""
    return rgb * alpha[..., None] + (1.0 - alpha[..., None])


def _from_pil(img: Image.Image) -> tuple[np.ndarray, PhotoTraits]:
    """Any Pillow mode to float32 RGB in [0, 1] (colour as stored, not blended) and its traits; exotic float
    modes refused."""
    w, h = img.size
    if w == 0 or h == 0:
        raise InvalidImageError(f"image has zero size ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InvalidImageError(f"image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
    mode = img.mode
    # A CMYK or Lab profile does not describe the RGB the output is: only an RGB or grey one is carried over.
    icc = img.info.get("icc_profile") if mode in _ICC_MODES else None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG): Pillow keeps the full 0..65535 range.
        grey = np.asarray(img, dtype=np.float64)
        sixteen = grey.max() > 255 or mode.startswith("I;16")
        grey = np.clip(grey / (65535.0 if sixteen else 255.0), 0, 1).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2), PhotoTraits(grey=True, sixteen_bit=sixteen, icc_profile=icc)
    if mode == "F":
        raise InvalidImageError("floating-point ('F' mode) images are not supported; save as 8- or 16-bit")
    if mode == "P":
        mode = "RGBA" if img.has_transparency_data else "RGB"
        img = img.convert(mode)
    grey = mode in ("1", "L", "LA", "La")
    alpha = None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb, alpha = rgba[..., :3], np.ascontiguousarray(rgba[..., 3])
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgb), PhotoTraits(grey=grey, alpha=alpha, icc_profile=icc)


def _from_array(arr: np.ndarray) -> tuple[np.ndarray, PhotoTraits]:
    """A NumPy image (H x W, H x W x 1/3/4; uint8, uint16, bool or float in [0, 1]) to float RGB and its traits.

    16-bit colour arrays are restored, but come back 8-bit: Pillow images, what a restoration returns, hold
    16 bits for grey only."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidImageError(f"array image must be H x W or H x W x 1/3/4, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidImageError(f"image has zero size ({arr.shape[1]}x{arr.shape[0]})")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise InvalidImageError(f"image of {arr.shape[1]}x{arr.shape[0]} pixels exceeds the limit of {MAX_PIXELS}")
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    elif arr.dtype == np.bool_:
        x = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidImageError("float image contains NaN or infinity")
        if arr.min() < 0 or arr.max() > 1:
            raise InvalidImageError("float images must lie in [0, 1]")
        x = arr.astype(np.float32)
    else:
        raise InvalidImageError(f"unsupported array dtype {arr.dtype}; use uint8, uint16, bool or float in [0, 1]")
    traits = PhotoTraits(grey=x.ndim == 2, sixteen_bit=x.ndim == 2 and arr.dtype == np.uint16)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    elif x.shape[2] == 4:
        traits = PhotoTraits(alpha=np.ascontiguousarray(x[..., 3], dtype=np.float32))
        x = x[..., :3]
    return np.ascontiguousarray(x, dtype=np.float32), traits


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1: upright as stored), read from the header without decoding pixels."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block: show the pixels as stored, as viewers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows the image: orientations 5-8 turn it a quarter."""
    w, h = img.size
    return (h, w) if _orientation(img) >= 5 else (w, h)


def image_size(source: ImageInput) -> tuple[int, int]:
    """(width, height) of an input without decoding its pixels (for files, from the header only)."""
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3):
            raise InvalidImageError(f"array image must be H x W or H x W x 1/3/4, got shape {source.shape}")
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        return source.size
    if not isinstance(source, (str, os.PathLike, bytes)):
        raise InvalidImageError(f"expected a path, bytes, PIL image or NumPy array, got {type(source).__name__}")
    path = "image bytes" if isinstance(source, bytes) else Path(source)
    try:
        f = io.BytesIO(source) if isinstance(source, bytes) else open_regular(path)
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        with f, Image.open(f) as img:
            return _upright_size(img)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = "unrecognised file format" if "cannot identify image file" in str(exc) else str(exc)
        raise InvalidImageError(f"{path}: not a readable image ({reason})") from exc


def load_image(source: ImageInput, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Read a path, Pillow image or array into float32 RGB in [0, 1], or raise InvalidImageError.

    Files are checked for size before their pixels are decoded, so a header that
    declares 100k x 100k pixels is refused without allocating them. ``reduce_to`` (width,
    height) says the caller will shrink the image to that size: a large file is then decoded
    at a fraction of its size where the format allows (JPEG) and box-reduced by an integer
    factor otherwise, never below that size, before it becomes float. Transparent images are
    blended onto white; ``load_photo`` keeps their alpha apart instead.
    """
    rgb, traits = load_photo(source, reduce_to)
    return rgb if traits.alpha is None else _blend_on_white(rgb, traits.alpha).astype(np.float32)


def load_photo(source: ImageInput, reduce_to: tuple[int, int] | None = None) -> tuple[np.ndarray, PhotoTraits]:
    """``load_image`` for a restoration: the colour as stored (not blended) and the traits to put back.

    A file (or its bytes) is turned upright as its EXIF orientation says; a Pillow image or array is taken
    as given.
    Only regular files are opened (a FIFO would block).
    """
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        return _from_pil(source)
    if isinstance(source, bytes):
        return decode_photo_bytes(source, "image bytes", reduce_to)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidImageError(f"expected a path, bytes, PIL image or NumPy array, got {type(source).__name__}")
    path = Path(source)
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_photo_bytes(data, path, reduce_to)


def decode_image_bytes(data: bytes, name: str | os.PathLike, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an encoded image file's bytes (``name`` labels errors) with the same checks as ``load_image``."""
    rgb, traits = decode_photo_bytes(data, name, reduce_to)
    return rgb if traits.alpha is None else _blend_on_white(rgb, traits.alpha).astype(np.float32)


def decode_photo_bytes(data: bytes, name: str | os.PathLike,
                       reduce_to: tuple[int, int] | None = None) -> tuple[np.ndarray, PhotoTraits]:
    """``load_photo`` of an encoded file's bytes, for callers that hold them already (a restore-many worker)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise InvalidImageError(f"{name}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
                stored = None
                if reduce_to is not None:
                    # reduce_to is upright; the pixels are stored turned when the orientation is 5-8
                    stored = reduce_to[::-1] if _orientation(img) >= 5 else reduce_to
                    img.draft(img.mode, stored)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= reduce_to
                img.load()
                if stored is not None:
                    factor = min(img.size[0] // stored[0], img.size[1] // stored[1])
                    if factor >= 2 and img.mode in ("L", "RGB", "RGBA", "LA", "I", "I;16", "F"):
                        img = img.reduce(factor)
                img = ImageOps.exif_transpose(img)
                return _from_pil(img)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{name}: image is too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = "unrecognised file format" if "cannot identify image file" in str(exc) else str(exc)
        raise InvalidImageError(f"{name}: not a readable image ({reason})") from exc


def resize(image: np.ndarray, width: int, height: int | None = None) -> np.ndarray:
    """Bicubic resize of float RGB in [0, 1] to width x height (a square when height is None)."""
    height = width if height is None else height
    if image.shape[:2] == (height, width):
        return image
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize((width, height), Image.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 1).astype(np.float32)


def to_model_input(image: np.ndarray) -> np.ndarray:
    """H x W x 3 in [0, 1] to the VQ encoder's 1 x 3 x H x W in [-1, 1]."""
    return np.ascontiguousarray((image.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32))


def from_model_output(pixels: np.ndarray) -> np.ndarray:
    """The VQ decoder's 1 x 3 x H x W in [-1, 1] back to H x W x 3 in [0, 1]."""
    return np.clip((pixels[0].transpose(1, 2, 0) + 1.0) / 2.0, 0, 1).astype(np.float32)


def _blur(image: np.ndarray, dilation: int) -> np.ndarray:
    """3x3 [1,2,1]x[1,2,1]/16 blur with the given dilation and replicate padding."""
    d = dilation
    h, w = image.shape[:2]
    p = np.pad(image, ((d, d), (d, d), (0, 0)), mode="edge")
    weights = (1.0, 2.0, 1.0)
    out = np.zeros_like(image)
    for i, wy in enumerate(weights):
        for j, wx in enumerate(weights):
            out += (wy * wx / 16.0) * p[i * d : i * d + h, j * d : j * d + w]
    return out


def low_frequencies(image: np.ndarray, levels: int = COLOR_FIX_LEVELS) -> np.ndarray:
    """What remains after ``levels`` dilated blurs (dilation 2**i): the image's colour and shading."""
    low = image
    for i in range(levels):
        low = _blur(low, 2**i)
    return low


def color_fix(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Wavelet colour fix: the output's high frequencies plus the reference's low frequencies."""
    high = output - low_frequencies(output)
    return np.clip(high + low_frequencies(reference), 0, 1).astype(np.float32)


def _resize_channel(channel: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of one float H x W channel, clipped to [0, 1]."""
    if channel.shape == (height, width):
        return channel
    out = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F").resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(out), 0, 1)


def to_pil(image: np.ndarray, traits: PhotoTraits | None = None) -> Image.Image:
    """Float RGB in [0, 1] to a Pillow image, with what ``traits`` says the input had put back.

    Grey inputs give a grey image (the luma of the restored colour, so no tint between channels is
    left), 16-bit grey ones mode I;16: the restoration is float throughout, and its smooth regions
    take their levels from the 16-bit input (the colour fix's low frequencies), so scaling to 65535 and
    rounding keeps gradients free of 8-bit steps. An alpha channel is resized bicubic to the output and
    attached (RGBA, LA); the colour profile goes into ``info["icc_profile"]``, which ``save_image_atomic``
    embeds.
    """
    traits = traits or PhotoTraits()
    x = np.clip(image, 0, 1)
    if traits.grey:
        x = np.clip(x @ LUMA, 0, 1)
    if traits.grey and traits.sixteen_bit and traits.alpha is None:
        img = Image.fromarray(np.rint(x * 65535).astype(np.uint16))  # mode I;16
    else:
        img = Image.fromarray(np.rint(x * 255).astype(np.uint8), mode="L" if traits.grey else "RGB")
        if traits.alpha is not None:
            alpha = _resize_channel(traits.alpha, img.width, img.height)
            img.putalpha(Image.fromarray(np.rint(alpha * 255).astype(np.uint8), mode="L"))
    if traits.icc_profile:
        img.info["icc_profile"] = traits.icc_profile
    return img


def to_format_mode(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in a mode the format ``fmt`` can store: 16-bit grey to 8 bits outside PNG and TIFF, alpha
    blended onto white where the format has none (JPEG); the colour profile kept."""
    keeps = _FORMAT_MODES.get(fmt, {"L", "RGB"})
    out = image
    if out.mode not in keeps and out.mode == "I;16":
        out = Image.fromarray(np.rint(np.asarray(out, np.float32) / 257).astype(np.uint8), mode="L")
    if out.mode not in keeps and out.mode in ("LA", "RGBA"):
        if "RGBA" in keeps:
            out = out.convert("RGBA")
        else:
            base = "L" if out.mode == "LA" and "L" in keeps else "RGB"
            out = Image.alpha_composite(Image.new("RGBA", out.size, "white"), out.convert("RGBA")).convert(base)
    if out.mode not in keeps:
        out = out.convert("RGB")
    if out is not image and "icc_profile" in image.info:
        out.info["icc_profile"] = image.info["icc_profile"]
    return out


def image_format(path: str | os.PathLike) -> str:
    """The format ``path``'s extension names, one Pillow can write (PNG when it has none), or InvalidImageError."""
    path = Path(path)
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower()) if path.suffix else "PNG"
    if fmt is None or fmt not in Image.SAVE:
        raise InvalidImageError(f"cannot tell an image format to write from the extension of {path}: use .png, "
                                ".jpg, .webp or .tif, say, or no extension for PNG")
    return fmt


def check_output(path: str | os.PathLike, quality: int | None = None) -> str:
    """The output's format (``image_format``); ``quality`` is refused unless the format is lossy (JPEG, WebP)."""
    fmt = image_format(path)
    if quality is not None:
        if fmt not in LOSSY_FORMATS:
            raise OutputError(f"{path}: a quality applies to lossy outputs (.jpg, .webp), not {fmt}")
        if not 1 <= quality <= 100:
            raise OutputError(f"quality must lie in 1..100, got {quality}")
    return fmt


def save_image_atomic(image: Image.Image, path: str | os.PathLike, *, overwrite: bool = True,
                      quality: int | None = None) -> None:
    """Write ``image`` atomically (pure_lite.atomic) in the format of its extension (``check_output``), in a
    mode that format holds (``to_format_mode``), with its colour profile; ``quality`` for JPEG and WebP.

    With ``overwrite=False`` an existing file is never replaced; that, and any failure to write,
    is an OutputError naming the path.
    """
    fmt = check_output(path, quality)
    image = to_format_mode(image, fmt)
    options = {} if quality is None else {"quality": quality}
    if image.info.get("icc_profile"):
        options["icc_profile"] = image.info["icc_profile"]
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format=fmt, **options)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """``save_image_atomic`` for a file encoded elsewhere (a worker's PNG bytes, a report)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
