import numpy as np
import pytest
from conftest import TARGET
from PIL import Image

from pure_lite import Restorer, SamplingConfig
from pure_lite.errors import CheckpointError, MissingDependencyError

FAST = SamplingConfig(max_text_tokens=12)


@pytest.fixture(scope="module")
def restorer(tiny_checkpoint):
    return Restorer.from_pretrained(tiny_checkpoint)


def test_restore_returns_target_size_image(restorer, rgb_image):
    res = restorer.restore(rgb_image, seed=3, sampling=FAST, target_size=TARGET)
    assert isinstance(res.image, Image.Image) and res.image.mode == "RGB"
    assert res.image.size == (TARGET, TARGET)
    assert res.entropy.shape == (TARGET // 8, TARGET // 8)
    layout = restorer.components.layout
    start = int(np.flatnonzero(res.tokens == layout.image_start)[0])
    codes = layout.parse_image(res.tokens[start:-1])
    assert codes.shape == (8, 8) and res.tokens[-1] == layout.end_of_turn
    assert res.prompt_tokens[0] == layout.bos and res.prompt_tokens[-1] == layout.end_of_turn
    assert isinstance(res.text, str) and {"prefill_s", "image_s"} <= res.timings.keys()


def test_same_seed_same_tokens(restorer, rgb_image):
    a = restorer.restore(rgb_image, seed=5, sampling=FAST, target_size=TARGET)
    b = restorer.restore(rgb_image, seed=5, sampling=FAST, target_size=TARGET)
    c = restorer.restore(rgb_image, seed=6, sampling=FAST, target_size=TARGET)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(a.tokens, c.tokens)  # near-uniform random logits: other seeds differ


def test_inputs_path_array_pil_agree(restorer, rgb_image, tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(rgb_image).save(path)
    greedy = SamplingConfig(temperature=0, max_text_tokens=4)
    outs = [restorer.restore(x, sampling=greedy, target_size=TARGET).tokens
            for x in (rgb_image, Image.fromarray(rgb_image), path)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_color_fix_keeps_input_colours(restorer):
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[..., 0] = 200  # a flat red input: low frequencies of the output must follow it
    means = [
        np.asarray(restorer.restore(flat, seed=0, sampling=FAST, target_size=TARGET, color_fix=fix).image,
                   dtype=np.float64).mean(axis=(0, 1))
        for fix in (True, False)
    ]
    errors = [np.abs(m - [200, 0, 0]).max() for m in means]
    assert errors[0] < 20 < errors[1]  # clipping at 0 leaves a little bias; without the fix it is far off


def test_bad_target_size(restorer, rgb_image):
    with pytest.raises(ValueError, match="multiple of 32"):
        restorer.restore(rgb_image, target_size=100)


def test_missing_files_reported(tiny_compact, tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_compact, broken)
    (broken / "vq_ds8_c2i.pt").unlink()
    with pytest.raises(CheckpointError, match="vq_ds8_c2i.pt"):
        Restorer.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        Restorer.from_pretrained(tmp_path / "nowhere")


def test_tampered_weights_rejected(tiny_compact, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_compact, broken)
    shard = next(p for p in broken.glob("model*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if "q_proj" in k)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        Restorer.from_pretrained(broken)


def test_a_checkpoint_restores_at_the_size_it_records(tiny_compact, tmp_path, rgb_image):
    """A model trained by pure-lite records its side in config.json; restore tiles at it, not at PURE's 512."""
    import json
    import shutil

    from pure_lite.checkpoint import IMAGE_SIZE_KEY

    assert Restorer.from_pretrained(tiny_compact).components.image_size == 512  # the released PURE records none
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_compact, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, IMAGE_SIZE_KEY: 64}))
    res = Restorer.from_pretrained(ckpt).restore(rgb_image[:24, :16], seed=0, sampling=FAST)  # x4: 64 x 96
    assert res.image.size == (64, 96) and len(res.tiles) >= 2  # one 512 tile would have covered it all
    assert {(t.box[2] - t.box[0], t.box[3] - t.box[1]) for t in res.tiles} == {(64, 64)}
    for bad in (100, 0, "64"):
        (ckpt / "config.json").write_text(json.dumps({**config, IMAGE_SIZE_KEY: bad}))
        with pytest.raises(CheckpointError, match=f"{IMAGE_SIZE_KEY} must be a multiple of 32"):
            Restorer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    # bitsandbytes' CPU 4-bit kernels need input widths of at least 64
    from pure_lite.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny64"), layout="compact", hidden_size=64,
                                intermediate_size=128)


@pytest.mark.parametrize("quant, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_restore_on_cpu(tiny64, rgb_image, quant, layer):
    pytest.importorskip("bitsandbytes", reason="install the [quant] extra")
    restorer = Restorer.from_pretrained(tiny64, quantization=quant)
    lm = restorer.components.new_decoder().lm.model
    assert type(lm.layers[0].mlp.down_proj).__name__ == layer
    res = restorer.restore(rgb_image, seed=0, sampling=FAST, target_size=TARGET)
    assert res.image.size == (TARGET, TARGET)
    restorer.components.layout.parse_image(res.tokens[np.flatnonzero(res.tokens == restorer.components.layout.image_start)[0]:-1])


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cpu"}, "needs a CUDA device"),
    ({"device": "cuda", "dtype": "float16"}, "computes in bfloat16"),
])
def test_int4_refuses_what_its_kernel_cannot_run(tiny64, kwargs, message):
    """torchao's int4 path is CUDA + bf16 only: a CPU device or an fp16 dtype is refused before any weight is read."""
    torch = pytest.importorskip("torch")
    if "dtype" in kwargs:
        kwargs = {**kwargs, "dtype": getattr(torch, kwargs["dtype"])}
    with pytest.raises(ValueError, match=message):
        Restorer.from_pretrained(tiny64, quantization="int4", **kwargs)


def test_int4_without_torchao_names_the_extra(tiny64, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed: `import torchao` fails
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(MissingDependencyError, match=r"pure-lite\[torchao\]"):
        Restorer.from_pretrained(tiny64, device="cuda", quantization="int4")


def test_unknown_quantization_or_cache_is_refused(tiny64):
    with pytest.raises(ValueError, match="'nf4', 'int8', 'int4' or None"):
        Restorer.from_pretrained(tiny64, quantization="int3")
    with pytest.raises(ValueError, match="kv_cache must be 'int8', 'int4' or None"):
        Restorer.from_pretrained(tiny64, kv_cache="fp8")


@pytest.mark.parametrize("kind, packed", [("int8", 1), ("int4", 2)])
def test_quantized_kv_cache_restores_through_the_backend(tiny64, rgb_image, kind, packed):
    """kv_cache="int8"/"int4" reaches the decoder: its cache holds int8 bytes (two values a byte for int4) and
    a restoration comes out whole."""
    torch = pytest.importorskip("torch")
    restorer = Restorer.from_pretrained(tiny64, kv_cache=kind)
    assert restorer.components.description.endswith(f"{kind} KV cache)")
    res = restorer.restore(rgb_image, seed=0, sampling=FAST, target_size=TARGET)
    assert res.image.size == (TARGET, TARGET)
    decoder = restorer.components.new_decoder()
    cached = decoder.kv.groups[0].kv[0]
    assert cached.dtype == torch.int8 and cached.shape[-1] * packed == decoder.head_dim


def test_int4_quantizes_exactly_the_decoder_linears_tinygemm_can_pack():
    """The filter takes every decoder linear whose widths fit group 128 and 8-column tiles, and nothing else."""
    torch = pytest.importorskip("torch")
    from pure_lite.torch_backend.quantize import _int4_fits

    assert _int4_fits(torch.nn.Linear(256, 512, bias=False))
    assert _int4_fits(torch.nn.Linear(128, 8))
    assert not _int4_fits(torch.nn.Linear(64, 512))  # input narrower than one group
    assert not _int4_fits(torch.nn.Linear(192, 512))  # 1.5 groups
    assert not _int4_fits(torch.nn.Linear(256, 12))  # output not a multiple of 8
    assert not _int4_fits(torch.nn.LayerNorm(256))
