"""Shared fixtures: tiny checkpoints in the released layout, built once per test session."""

from __future__ import annotations

import numpy as np
import pytest

from pure_lite.tokens import TokenLayout

TARGET = 64  # output side used in tests: 8 x 8 codes, a 76-token image block


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
def export_compact_int8(tiny_compact, tmp_path_factory):
    return _export(tiny_compact, tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def export_compact_int4(tiny_compact, tmp_path_factory):
    return _export(tiny_compact, tmp_path_factory, "int4")
