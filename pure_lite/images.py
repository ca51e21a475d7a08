"""Image input and output (docs/pure-format.md §3): safe loading and conversion, resizing, the wavelet colour fix.

Everything here is NumPy + Pillow so the torch backend and the torch-free runtime share it.
Pixels travel as float32 H x W x 3 arrays in [0, 1] between these functions.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .atomic import atomic_path
from .errors import InvalidImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

MAX_PIXELS = 64 * 1024 * 1024  # refuse to decode anything larger (decompression bombs)
COLOR_FIX_LEVELS = 5


def _blend_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite float RGB in [0, 1] over white with alpha in [0, 1] (docs/pure-format.md §3: RGBA is blended onto white)."""
    return rgb * alpha[..., None] + (1.0 - alpha[..., None])


def _from_pil(img: Image.Image) -> np.ndarray:
    """Any Pillow mode to float32 RGB in [0, 1]; 16-bit and alpha handled, exotic float modes refused."""
    w, h = img.size
    if w == 0 or h == 0:
        raise InvalidImageError(f"image has zero size ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InvalidImageError(f"image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG): Pillow keeps the full 0..65535 range.
        grey = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if grey.max() > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(grey / scale, 0, 1).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        raise InvalidImageError("floating-point ('F' mode) images are not supported; save as 8- or 16-bit")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return _blend_on_white(rgba[..., :3], rgba[..., 3]).astype(np.float32)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _from_array(arr: np.ndarray) -> np.ndarray:
    """A NumPy image (H x W, H x W x 1/3/4; uint8, uint16, bool or float in [0, 1]) to float RGB."""
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
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    elif x.shape[2] == 4:
        x = _blend_on_white(x[..., :3], x[..., 3])
    return np.ascontiguousarray(x, dtype=np.float32)


def image_size(source: ImageInput) -> tuple[int, int]:
    """(width, height) of an input without decoding its pixels (for files, from the header only)."""
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3):
            raise InvalidImageError(f"array image must be H x W or H x W x 1/3/4, got shape {source.shape}")
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        return source.size
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidImageError(f"expected a path, PIL image or NumPy array, got {type(source).__name__}")
    path = Path(source)
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = "unrecognised file format" if "cannot identify image file" in str(exc) else str(exc)
        raise InvalidImageError(f"{path}: not a readable image ({reason})") from exc


def load_image(source: ImageInput, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Read a path, Pillow image or array into float32 RGB in [0, 1], or raise InvalidImageError.

    Files are checked for size before their pixels are decoded, so a header that
    declares 100k x 100k pixels is refused without allocating them. ``reduce_to`` (width,
    height) says the caller will shrink the image to that size: a large file is then decoded
    at a fraction of its size where the format allows (JPEG) and box-reduced by an integer
    factor otherwise, never below that size, before it becomes float.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        return _from_pil(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidImageError(f"expected a path, PIL image or NumPy array, got {type(source).__name__}")
    path = Path(source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_image_bytes(data, path, reduce_to)


def decode_image_bytes(data: bytes, name: str | os.PathLike, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an encoded image file's bytes (``name`` labels errors) with the same checks as ``load_image``.

    For callers that hold the bytes already, such as a worker that was sent a file's content.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise InvalidImageError(f"{name}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
                if reduce_to is not None:
                    img.draft("RGB", reduce_to)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= reduce_to
                img.load()
                if reduce_to is not None:
                    factor = min(img.size[0] // reduce_to[0], img.size[1] // reduce_to[1])
                    if factor >= 2 and img.mode in ("L", "RGB", "RGBA", "LA", "I", "I;16", "F"):
                        img = img.reduce(factor)
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


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB")


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format ``path``'s extension names (PNG when it has none), or InvalidImageError."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower()) if path.suffix else "PNG"
    if fmt is None:
        raise InvalidImageError(f"cannot tell an image format from the extension of {path}")
    return fmt


def save_image_atomic(image: Image.Image, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write ``image`` atomically (pure_lite.atomic) in the format of its extension (``image_format``).

    With ``overwrite=False`` an existing file is never replaced; that, and any failure to write,
    is an OutputError naming the path.
    """
    fmt = image_format(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format=fmt)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """``save_image_atomic`` for a file encoded elsewhere (a worker's PNG bytes, a report)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
