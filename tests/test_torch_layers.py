"""pure_lite.torch_backend.layers (the torch backend's own layer forward) against transformers' Chameleon layers,
both run by TorchDecoder over the same kind of grouped cache.

- float32, with the projections separate and joined: every logit of a prefill, a CFG image step and a two-token step within 1e-5 of the largest
  (rounding order only; 1% with the int8 cache, where a last-bit difference can flip a rounding), in
  both layer orders (Chameleon-7B's pre-norm, and the swin norm of the 30B model);
- bfloat16 on CPU, fp16 on a GPU eager and captured (marker ``gpu``): within what their rounding
  allows (cosine >= 0.999 per row);
- the kernel count per layer (aten calls other than views, as a CUDA graph would replay them): at
  most 60% of transformers', fewer still with the projections joined (``fuse_projections``). The greedy parity with an independent reference is
  tests/test_decode_parity.py's.
"""

import numpy as np
import pytest
import torch
from conftest import load_benchmark_module, probe_logits

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.tokens import TokenLayout
from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
from pure_lite.torch_backend.decoder import TorchDecoder
from pure_lite.torch_backend.layers import fuse_projections

count_kernels = load_benchmark_module("kernel_count").count_kernels


@pytest.fixture(scope="module")
def compact(tiny_compact):
    files = CheckpointFiles.locate(tiny_compact)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    return files, layout


def _lm(compact, swin: bool, dtype=torch.float32):
    files, _ = compact
    lm = load_language_model(files)
    if swin:  # the 30B model's layer order; the same weights, rearranged use
        lm.config.swin_norm = True
        from transformers.models.chameleon.modeling_chameleon import ChameleonSwinDecoderLayer

        for i, layer in enumerate(lm.model.layers):
            swapped = ChameleonSwinDecoderLayer(lm.config, i)
            swapped.load_state_dict(layer.state_dict())
            lm.model.layers[i] = swapped
    return lm.to(dtype).eval()


def _logits(lm, layout, layers: str, **kw):
    return probe_logits(TorchDecoder(lm, ImageHead(lm, layout.image_ids), layers=layers, **kw), layout)


@pytest.mark.parametrize("swin", [False, True])
@pytest.mark.parametrize("kv_cache", [None, "int8"])
@pytest.mark.parametrize("joined", [False, True])
def test_fused_layers_match_transformers_float32(compact, swin, kv_cache, joined):
    lm = _lm(compact, swin)
    reference = _logits(lm, compact[1], "transformers", kv_cache=kv_cache)
    if joined:
        assert fuse_projections(lm) == 2 * lm.config.num_hidden_layers
        assert not hasattr(lm.model.layers[0].self_attn, "q_proj")
    fused = _logits(lm, compact[1], "fused", kv_cache=kv_cache)
    # an int8 cache rounds keys and values to 1/254 of their absmax: a last-bit difference can flip one
    # rounding, so there the bound is that of a few flipped steps (measured: 0.4% of the largest logit)
    tolerance = 0.01 if kv_cache else 1e-5
    for a, b in zip(reference, fused):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=tolerance * np.abs(a).max())
    assert np.abs(reference[1]).max() > 1  # not a vacuous comparison of near-zero logits


def _assert_close_rows(reference, candidate, at_least=0.999):
    for a, b in zip(reference, candidate):
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cosine.min() >= at_least, cosine.min()


def test_fused_layers_match_transformers_bfloat16(compact):
    lm = _lm(compact, False, torch.bfloat16)
    _assert_close_rows(_logits(lm, compact[1], "transformers"), _logits(lm, compact[1], "fused"))


@pytest.mark.gpu
def test_fused_layers_match_transformers_on_cuda_fp16(compact):
    """On a GPU in fp16, eager and captured in CUDA graphs (the kernels a 7B step replays)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    lm = _lm(compact, False, torch.float16).to("cuda")
    reference = _logits(lm, compact[1], "transformers", device="cuda", graphs=False)
    _assert_close_rows(reference, _logits(lm, compact[1], "fused", device="cuda", graphs=False))
    _assert_close_rows(reference, _logits(lm, compact[1], "fused", device="cuda", attend_bucket=16))


def _kernels_per_layer(compact, variant: str) -> int:
    """Kernels of one layer of a CFG image step: the difference between a 1-layer and a 2-layer model's counts
    (``benchmarks/kernel_count.py``: aten calls and Triton launches)."""
    _, layout = compact
    counts = []
    for depth in (1, 2):
        lm = _lm(compact, False)
        lm.model.layers = lm.model.layers[:depth]
        lm.config.num_hidden_layers = depth
        if variant in ("joined", "triton"):
            fuse_projections(lm)
        layers = {"joined": "fused"}.get(variant, variant)
        dec = TorchDecoder(lm, ImageHead(lm, layout.image_ids), layers=layers)
        dec.prefill([[5, 6, 7]], 16, 2, unconditional_capacity=8)
        dec.begin_unconditional()
        step = count_kernels(dec, lambda: dec.step(np.full((2, 1), layout.image_ids[0]), image=True))
        counts.append(sum(step.values()))
    return counts[1] - counts[0]


def test_fused_layers_launch_at_most_60_percent_of_the_kernels(compact):
    per_layer = {variant: _kernels_per_layer(compact, variant) for variant in ("transformers", "fused", "joined")}
    assert per_layer["fused"] <= 0.6 * per_layer["transformers"], per_layer
    assert per_layer["joined"] < per_layer["fused"], per_layer  # three matmuls in one, two in another


def test_transformers_layers_refuse_joined_projections(compact):
    lm = _lm(compact, False)
    fuse_projections(lm)
    with pytest.raises(ValueError, match="fuse_projections"):
        TorchDecoder(lm, ImageHead(lm, compact[1].image_ids), layers="transformers")


def test_triton_layers_launch_11_kernels_per_layer(compact):
    """4 matmuls, 2 attention calls (one per cache group) and the join of their outputs, and 4 Triton kernels:
    the residual add and norm twice, the qk norm with rotary and the cache write, silu-and-multiply."""
    pytest.importorskip("triton", reason="Triton is installed with the [test] extra on Linux x86_64")
    assert _kernels_per_layer(compact, "triton") == 11
    assert _kernels_per_layer(compact, "joined") == 21
