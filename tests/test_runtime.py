"""The torch-free runtime against the torch backend, on exported tiny checkpoints."""

import subprocess
import sys

import numpy as np
import pytest

from pure_lite import GenerationCancelled, GenerationError, Restorer, SamplingConfig
from pure_lite.runtime import KVBuffers
from pure_lite.runtime.engine import SLOT_ALIGN

from conftest import TARGET


@pytest.fixture(scope="module", params=["compact", "pure"])
def pair(request):
    ckpt = request.getfixturevalue(f"tiny_{request.param}")
    export = request.getfixturevalue(f"export_{request.param}_float")
    return Restorer.from_pretrained(ckpt), Restorer.from_pretrained(export)


@pytest.mark.parametrize("cfg_scale", [1.0, 0.8])
def test_runtime_greedy_equals_torch(pair, rgb_image, cfg_scale):
    torch_r, onnx_r = pair
    assert onnx_r.components.description.startswith("onnxruntime")
    greedy = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, max_text_tokens=8)
    a = torch_r.restore(rgb_image, sampling=greedy, target_size=TARGET)
    b = onnx_r.restore(rgb_image, sampling=greedy, target_size=TARGET)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-3)
    diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16))
    assert diff.max() <= 2  # same codes; VQ decoder float rounding only


def test_runtime_seeded_sampling_repeats(pair, rgb_image):
    _, onnx_r = pair
    cfg = SamplingConfig(max_text_tokens=8)
    a = onnx_r.restore(rgb_image, seed=11, sampling=cfg, target_size=TARGET)
    b = onnx_r.restore(rgb_image, seed=11, sampling=cfg, target_size=TARGET)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_kv_cache_allocated_once_per_restoration(export_compact_float, rgb_image):
    r = Restorer.from_pretrained(export_compact_float)
    seen = []  # identities of the KV buffers and of their memory, recorded at every decoder call
    make = r.components.new_decoder

    def spy():
        dec = make()
        step = dec.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            seen.append((id(dec.kv), tuple(dec.kv.pointer(b) for b in dec.kv.cache + dec.kv.scratch)))
            return out

        dec.step = recording_step
        return dec

    object.__setattr__(r.components, "new_decoder", spy)
    before = KVBuffers.allocations
    r.restore(rgb_image, seed=0, sampling=SamplingConfig(max_text_tokens=8), target_size=TARGET)
    assert KVBuffers.allocations - before == 1
    assert len(seen) > 64 and len(set(seen)) == 1  # text, CFG switch and 64 image calls: same memory


def test_too_small_budget_is_an_error_before_decoding(export_compact_float, rgb_image):
    r = Restorer.from_pretrained(export_compact_float)
    with pytest.raises(GenerationError, match="image block needs"):
        r.restore(rgb_image, sampling=SamplingConfig(max_new_tokens=50), target_size=TARGET)


def test_model_that_never_starts_an_image_still_gives_a_wellformed_block(export_compact_float, rgb_image):
    r = Restorer.from_pretrained(export_compact_float)
    res = r.restore(rgb_image, seed=0, sampling=SamplingConfig(max_text_tokens=3), target_size=TARGET)
    layout = r.components.layout
    assert len(res.tokens) == 3 + len(layout.encode_image(np.zeros((8, 8), np.int64))) + 1
    layout.parse_image(res.tokens[3:-1])


def test_cancel_stops_with_a_clear_error(export_compact_float, rgb_image):
    r = Restorer.from_pretrained(export_compact_float)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(GenerationCancelled, match="cancelled"):
        r.restore(rgb_image, seed=0, sampling=SamplingConfig(max_text_tokens=3), target_size=TARGET, cancel=cancel)


def test_progress_counts_tiles_in_fractions_before_the_first_is_done(export_compact_float, rgb_image):
    """The callback a page or a bar draws from: (tiles done, tiles), fractional within a batch, ending at all."""
    import dataclasses

    loaded = Restorer.from_pretrained(export_compact_float)
    r = Restorer(dataclasses.replace(loaded.components, image_size=TARGET))  # 64-pixel tiles: several of them
    seen = []
    sampling = SamplingConfig(max_text_tokens=3)
    res = r.restore(rgb_image, seed=0, sampling=sampling, scale=2, tile_batch=2,
                    progress=lambda done, tiles: seen.append((done, tiles)))
    tiles = len(res.tiles)
    assert tiles >= 3 and {t for _, t in seen} == {tiles}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == pytest.approx(tiles)
    assert done[0] == 0 and 0 < done[1] < 1  # (0, tiles) before decoding, then long before the first batch is done
    quiet = r.restore(rgb_image, seed=0, sampling=sampling, scale=2, tile_batch=2)
    np.testing.assert_array_equal(np.asarray(quiet.image), np.asarray(res.image))  # watching changes nothing


def test_runtime_never_imports_torch(export_compact_float, tmp_path):
    code = f"""
import sys, numpy as np
import pure_lite
from pure_lite import Restorer, SamplingConfig
r = Restorer.from_pretrained({str(export_compact_float)!r})
res = r.restore(np.zeros((32, 32, 3), np.uint8), seed=0, target_size=64, sampling=SamplingConfig(max_text_tokens=2))
assert res.image.size == (64, 64)
import pure_lite.cli
pure_lite.cli.build_parser()  # the command line is torch-free too
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "transformers")))
print("LEAKED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LEAKED []" in out.stdout


def test_provider_override_must_exist(export_compact_float):
    from pure_lite.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="not available"):
        Restorer.from_pretrained(export_compact_float, providers=["NoSuchExecutionProvider"])


def test_kv_reserve_keeps_every_rows_filled_slots():
    """Growing the cache view re-lays the rows out in place (blocks moved last first, each row's filled
    slots only): every filled slot of every row, head and layer keeps its keys/values, through growths
    small and large, with rows filled unevenly (an empty row, a full one). Every view is a whole number of
    SLOT_ALIGN slots, the capacity (700) rounded up to one too."""
    kv = KVBuffers(2, 6, 3, 700, 8, 4, 16, "cpu")
    assert kv.capacity == 704
    rng = np.random.default_rng(0)
    filled = np.zeros(6, np.int64)
    for slots in (5, 64, 65, 80, 300, 700):
        kv.reserve(slots, filled)
        assert kv.slots >= slots and kv.slots % SLOT_ALIGN == 0
        for view in kv.cache:
            assert view.shape == (6, 3, kv.slots, 8)
            view[...] = rng.normal(size=view.shape)
        filled = np.array([0, kv.slots, 1, kv.slots // 2, kv.slots - 1, 3])
        expected = [[view[r, :, :n].copy() for r, n in enumerate(filled)] for view in kv.cache]
        kv.reserve(kv.slots + 1 if kv.slots < 700 else 700, filled)
        for view, before in zip(kv.cache, expected):
            for r, n in enumerate(filled):
                np.testing.assert_array_equal(view[r, :, :n], before[r])
    assert kv.slots == 704
