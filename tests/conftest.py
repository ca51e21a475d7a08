"""Shared fixtures: tiny checkpoints in the released layout, built once per test session."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# pure_lite.torch_backend.fused_kernels compiles for CUDA; without a GPU its kernels run through Triton's interpreter,
# which reads this when the kernels are defined, so it is set before any test imports them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pure_lite.tokens import TokenLayout

TARGET = 64  # output side used in tests: 8 x 8 codes, a 76-token image block

ROWS = 16


def logit_rows(kind: str, width: int, rng: np.random.Generator) -> np.ndarray:
    """(ROWS, width) float32 logits of one shape of distribution (sampler tests: every scale, ties, flat, peaked)."""
    normal = rng.normal(size=(ROWS, width))
    if kind == "flat":
        x = np.zeros((ROWS, width))
    elif kind == "ties":  # few distinct values: many exact ties at the k-th largest
        x = rng.integers(0, 6, size=(ROWS, width)) * rng.choice([0.5, 3.0, 40.0], size=(ROWS, 1))
    elif kind == "peaked":  # one or a few ids far above the rest
        x = normal.copy()
        x[:, : rng.integers(1, 4)] += 40.0
    elif kind == "two-level":
        x = np.where(rng.random((ROWS, width)) < 0.01, 5.0, -30.0) + 0.01 * normal
    elif kind == "mid-entropy":  # entropy near 5 nats, where k moves fastest (~500 per nat)
        x = normal * rng.uniform(2.5, 3.6, size=(ROWS, 1))
    else:
        x = normal * {"tiny": 1e-4, "small": 0.1, "unit": 1.0, "large": 20.0, "huge": 1e4}[kind]
    return x.astype(np.float32)


def random_lpips_weights(net: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random LPIPS weights of NET's shapes (OIHW kernels), as convert_lpips_sdist writes them."""
    from pure_lite.lpips import NETS

    rng, out, in_ch, tap = np.random.default_rng(seed), {}, 3, 0
    for i, layer in enumerate(NETS[net]):
        fan_in = in_ch * layer.k * layer.k
        out[f"features.{i}.weight"] = rng.normal(0, np.sqrt(2 / fan_in), (layer.out, in_ch, layer.k, layer.k)).astype(np.float32)
        out[f"features.{i}.bias"] = rng.normal(0, 0.05, layer.out).astype(np.float32)
        if layer.tap:
            out[f"lin.{tap}.weight"] = rng.random(layer.out).astype(np.float32)
            tap += 1
        in_ch = layer.out
    return out


KINDS = ["tiny", "small", "unit", "large", "huge", "flat", "ties", "peaked", "two-level", "mid-entropy"]


def load_benchmark_module(name: str):
    """A module of ``benchmarks/`` (measuring tools live there, not in the library), loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_logits(decoder, layout: TokenLayout, lengths=(23, 17)) -> list[np.ndarray]:
    """Every logit of a prefill of two random prompts of ``lengths``, then with CFG rows one image step and one
    two-token step: the calls a layer implementation is compared on (TorchDecoder layer tests)."""
    rng = np.random.default_rng(0)
    capacity = max(lengths) + 32
    out = [decoder.prefill([rng.integers(4, 200, n).tolist() for n in lengths], capacity, 2, unconditional_capacity=16)]
    decoder.begin_unconditional()
    out.append(decoder.step(np.tile(layout.header(32, 32), (4, 1)), image=True))
    codes = layout.image_ids[rng.integers(0, layout.codebook_size, (4, 2))]
    out.append(decoder.step(codes, image=True, all_positions=True).reshape(8, -1))
    return out


@pytest.fixture(scope="session")
def tiny_pure(tmp_path_factory):
    from pure_lite.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_pure"), seed=0, layout="pure")


@pytest.fixture(scope="session")
def tiny_compact(tmp_path_factory):
    from pure_lite.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_compact"), seed=1, layout="compact")


@pytest.fixture(scope="session", params=["pure", "compact"])
def tiny_checkpoint(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def compact_layout(tiny_compact) -> TokenLayout:
    return TokenLayout.from_tokenizer_file(tiny_compact / "tokenizer.json")


@pytest.fixture(scope="session")
def pure_layout(tiny_pure) -> TokenLayout:
    return TokenLayout.from_tokenizer_file(tiny_pure / "tokenizer.json", vocab_size=73728)


@pytest.fixture
def rgb_image() -> np.ndarray:
    return (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)


def _export(checkpoint, tmp_path_factory, quantization):
    from pure_lite.export import export_onnx

    out = tmp_path_factory.mktemp(f"export_{quantization or 'float'}") / "onnx"
    return export_onnx(checkpoint, out, quantization=quantization, block_size=32, progress=None)


@pytest.fixture(scope="session")
def export_compact_float(tiny_compact, tmp_path_factory):
    return _export(tiny_compact, tmp_path_factory, None)


@pytest.fixture(scope="session")
def export_pure_float(tiny_pure, tmp_path_factory):
    return _export(tiny_pure, tmp_path_factory, None)


@pytest.fixture(scope="session")
def cli_export_compact_int8(tiny_compact, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``pure-lite export --quant int8`` of tiny_compact as a user runs it: the finished process and its folder.

    Made through the command line because one test checks what that command prints and writes; the library's
    tests use the same folder as their int8 export (``export_compact_int8``), one ~35 s export instead of two.
    The copy exported records a trained side of 64 in its config.json, as a model trained by pure-lite does:
    the manifest must carry it without ``--image-size``.
    """
    from pure_lite.checkpoint import IMAGE_SIZE_KEY

    checkpoint = tmp_path_factory.mktemp("trained_at_64") / "model"
    shutil.copytree(tiny_compact, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, IMAGE_SIZE_KEY: 64}))
    out = tmp_path_factory.mktemp("export_int8") / "onnx"
    result = subprocess.run([sys.executable, "-m", "pure_lite.cli", "export", str(checkpoint), "-o", str(out),
                             "--quant", "int8", "--block-size", "32"], capture_output=True, text=True, timeout=600)
    return result, out


@pytest.fixture(scope="session")
def export_compact_int8(cli_export_compact_int8):
    result, out = cli_export_compact_int8
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def export_compact_int4(tiny_compact, tmp_path_factory):
    return _export(tiny_compact, tmp_path_factory, "int4")
