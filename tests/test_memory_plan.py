"""The memory plan (pure_lite/torch_backend/memory.py): its weight and KV bytes equal what the backend allocates
(tiny checkpoints on CPU, the 7B shape on the meta device), its choices, and the CLI's refusal and plan line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pure_lite.generate import generate_batch
from pure_lite.prompt import TextTokenizer, prompt_ids
from pure_lite.sampling import SamplingConfig
from pure_lite.testing import write_released_vq_shapes
from pure_lite.torch_backend import memory
from pure_lite.torch_backend.kv_cache import GroupedKV, kv_bytes

TILE = 64


def _bytes(tensors) -> int:
    """Bytes of distinct tensors (by identity: a shared tensor counts once)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _cache_tensors(kv: GroupedKV) -> list:
    return [t for g in kv.groups for t in [*g.kv, *(g.scales or []), *(g.params or []), *(g.recent or []),
                                           *(g.prompt_kv or []), *(g.prompt_scales or []),
                                           *([g.recent_slot] if g.kind == "int4" else []), g.lengths, g.row_index]]


def _decoder_tensors(decoder) -> list:
    """Every weight tensor the torch decoder holds on its device: the model's, the image head's, the layers' own
    joined gains; with the vocabulary split the kept embedding rows and their id table instead of the whole
    embedding and lm_head (which moved to the text device: on CPU the same memory, so told apart by identity).
    transformers' unused VQ-VAE stays on the host (placement.py; test_placement_* checks it on the meta device)."""
    layers, lm = decoder.layers_fn, decoder.lm
    host = {id(t) for t in (*lm.model.vqmodel.parameters(), *lm.model.vqmodel.buffers())}
    tensors = [t for t in (*lm.parameters(), *lm.buffers()) if id(t) not in host]
    tensors += [*decoder.image_head.parameters(), *(t for pair in layers.qk_norms for t in pair), layers.rotate_sign]
    if decoder.vocab is not None:
        moved = {id(lm.model.embed_tokens.weight), id(lm.lm_head.weight)}
        tensors = [t for t in tensors if id(t) not in moved] + [decoder.vocab.kept, decoder.vocab.row]
    return tensors


def _on(device: str, *modules) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` that are on ``device``."""
    return _bytes(t for m in modules for t in (*m.parameters(), *m.buffers()) if t.device.type == device)


@pytest.mark.parametrize("text", [False, True])
def test_placement_moves_a_layer_at_a_time_and_leaves_the_host_part(tiny_pure, text):
    """placement.place with the meta device standing in for the GPU: while layer i is placed, no later layer is on
    the device (the device never holds the whole model in the model's dtype, what broke loading on an 8 GB card);
    afterwards the device holds exactly what the plan counts, and the unused VQ-VAE (and with the vocabulary on
    the host, the embedding and lm_head) never left the host."""
    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
    from pure_lite.torch_backend.decoder import TorchDecoder
    from pure_lite.torch_backend.placement import place

    lm = load_language_model(CheckpointFiles.locate(tiny_pure), device="cpu", dtype=torch.bfloat16)
    layers = lm.model.layers
    layer_bytes = _on("cpu", layers[0])
    seen = []

    def watch(i):
        assert all(p.device.type == "meta" for p in layers[i].parameters())
        assert all(p.device.type == "cpu" for later in layers[i + 1:] for p in later.parameters())
        assert hasattr(layers[i].self_attn, "qkv_proj") and hasattr(layers[i].mlp, "gate_up_proj")  # joined there
        assert _on("meta", lm) <= (i + 1) * layer_bytes
        seen.append(i)

    place(lm, "meta", tables_on_device=not text, on_layer=watch)
    assert seen == list(range(len(layers)))
    assert _on("meta", lm.model.vqmodel) == 0 and _on("cpu", lm.model.vqmodel) > 0
    assert (_on("meta", lm.model.embed_tokens, lm.lm_head) == 0) == text
    layout = memory.model_shape(tiny_pure, torch.bfloat16).layout
    kw = dict(text_device="cpu", image_phase_ids=layout.image_phase_ids) if text else {}
    decoder = TorchDecoder(lm, ImageHead(lm, layout.image_ids).to("meta"), "meta", **kw)
    shape = memory.model_shape(tiny_pure, torch.bfloat16)
    on_device = [t for t in _decoder_tensors(decoder) if t.device.type == "meta"]
    assert memory.peak(shape, memory.Setting(None, None, text), 1).weights == _bytes(on_device)


@pytest.mark.parametrize("kind", [None, "int8", "int4"])
@pytest.mark.parametrize("groups", [[(3, 40), (3, 17)], [(2, 300, 120), (2, 150)], [(2, 30, 50), (2, 20, 5)]])
def test_kv_bytes_is_what_the_cache_allocates(kind, groups):
    cache = GroupedKV(2, 4, 16, groups, 4, torch.bfloat16, "cpu", kind=kind)
    assert kv_bytes(2, 4, 16, groups, torch.bfloat16, kind) == _bytes(_cache_tensors(cache))


def test_kv_bytes_int4_layout():
    """The int4 layout the plan assumes, per slot of a 128-wide head (keys and values): after the prompt, two
    values per byte and a scale and an offset in the model's dtype per 16 values of a key and per 64 of a value
    (64 + 64 + 2 * (8 + 2) * 2 = 168 bytes); the prompt's slots int8 with a scale each (2 * (128 + 2) = 260
    bytes); one spare slot in each part; the newest 136 slots (or the capacity) also in the model's dtype, with
    an int64 slot each."""
    heads, packed, prompt_slot = 32, 168, 260

    def window(w):
        return 2 * heads * w * 128 * 2 + w * 8

    assert kv_bytes(1, heads, 128, [(1, 1000)], torch.bfloat16, "int4") == (
        heads * (1001 * packed + prompt_slot) + window(136) + 16)
    assert kv_bytes(1, heads, 128, [(1, 1000, 400)], torch.bfloat16, "int4") == (
        heads * (601 * packed + 401 * prompt_slot) + window(136) + 16)
    assert kv_bytes(1, heads, 128, [(1, 100, 400)], torch.bfloat16, "int4") == (  # a prompt past the capacity
        heads * (1 * packed + 101 * prompt_slot) + window(100) + 16)
    assert kv_bytes(1, heads, 128, [(1, 100, 50)], torch.bfloat16, "int8") == heads * 100 * prompt_slot + 16
    with pytest.raises(ValueError):
        kv_bytes(1, heads, 128, [(1, 100)], torch.bfloat16, "int2")


@pytest.mark.parametrize("dtype,kind,text", [(torch.float32, None, False), (torch.float32, "int8", False),
                                             (torch.float32, "int4", False),
                                             (torch.bfloat16, None, True)])
def test_plan_bytes_equal_the_loaded_decoders(tiny_compact, dtype, kind, text):
    """Load the tiny checkpoint, decode a batch of two 64² tiles; the weights it holds and the cache it allocated
    are exactly the plan's weight and KV bytes."""
    from pure_lite.torch_backend.load import load_components

    components = load_components(tiny_compact, dtype=dtype, kv_cache=kind, text_device="cpu" if text else None)
    decoder = components.new_decoder()
    shape = memory.ModelShape(tiny_compact, dtype, tile=TILE)
    side = TILE // 8
    prompt = prompt_ids(components.tokenizer, components.layout,
                        components.layout.encode_image(np.zeros((side, side), np.int64)))
    assert len(prompt) == shape.prompt_length
    generate_batch(decoder, [prompt, prompt], components.layout, TILE, SamplingConfig(temperature=0, max_text_tokens=3),
                   [np.random.default_rng(0), np.random.default_rng(1)], max_positions=components.max_positions)
    predicted = memory.peak(shape, memory.Setting(None, kind, text), tile_batch=2)
    assert predicted.weights == _bytes(_decoder_tensors(decoder))
    # generate_batch sized this cache for max_text_tokens=3, the plan for the default sampling: compare like with like
    sizes = [(g.rows, g.capacity, g.prompt) for g in decoder.kv.groups]
    assert sizes == memory.kv_groups(shape, 2, SamplingConfig(temperature=0, max_text_tokens=3))
    heads, head_dim = decoder.heads, decoder.head_dim
    assert kv_bytes(decoder.layers, heads, head_dim, sizes, dtype, kind) == _bytes(_cache_tensors(decoder.kv))


@pytest.fixture(scope="module")
def shape_7b(tiny_pure, tmp_path_factory):
    """A folder with PURE-7B's config and PURE's tokenizer (no weights: the plan reads none)."""
    folder = tmp_path_factory.mktemp("pure7b")
    for f in tiny_pure.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    config = json.loads((tiny_pure / "config.json").read_text())
    config.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096)
    config.pop("vq_config", None)  # transformers' default: the 7B's Chameleon VQ-VAE
    (folder / "config.json").write_text(json.dumps(config))
    write_released_vq_shapes(folder)  # PURE's own VQ-8, its shapes only: preferred over the tiny .pt beside it
    return folder


def test_7b_bytes_equal_a_meta_decoders(shape_7b):
    """The 7B shape: the plan's weight bytes equal a TorchDecoder built on the meta device from the same config,
    and its KV bytes the cache allocated there; the KV of a 512² restoration is docs/gpu.md's 6.6 GB (bf16)."""
    from transformers import ChameleonForConditionalGeneration

    from pure_lite.torch_backend.chameleon import ImageHead
    from pure_lite.torch_backend.decoder import TorchDecoder
    from pure_lite.torch_backend.layers import fuse_projections

    shape = memory.model_shape(shape_7b, torch.bfloat16)
    with torch.device("meta"):
        lm = ChameleonForConditionalGeneration._from_config(shape.config, dtype=torch.bfloat16)
    fuse_projections(lm)
    decoder = TorchDecoder(lm, ImageHead(lm, shape.layout.image_ids), "meta")
    peak = memory.peak(shape, memory.Setting(None, None), 1)
    assert peak.weights == _bytes(_decoder_tensors(decoder))
    groups = memory.kv_groups(shape, 1)
    cache = GroupedKV(32, 32, 128, groups, 4, torch.bfloat16, "meta")
    assert peak.kv == _bytes(_cache_tensors(cache))
    assert 6.5e9 < peak.kv < 6.7e9
    int8 = GroupedKV(32, 32, 128, groups, 4, torch.bfloat16, "meta", kind="int8")
    assert memory.peak(shape, memory.Setting("int4", "int8"), 1).kv == _bytes(_cache_tensors(int8))
    int4_kv = GroupedKV(32, 32, 128, groups, 4, torch.bfloat16, "meta", kind="int4")
    assert memory.peak(shape, memory.Setting("int4", "int4"), 1).kv == _bytes(_cache_tensors(int4_kv))
    # int4 weights, by torchao's layout (not allocatable without CUDA): 4 bits per decoder weight plus a bf16
    # scale and zero per 128 inputs; the embeddings, lm_head and everything else stay bf16
    packed = sum(m.weight.numel() for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear))
    int4 = memory.peak(shape, memory.Setting("int4", None), 1).weights
    assert int4 == peak.weights - packed * 2 + packed // 2 + packed // 128 * 4
    # the vocabulary off the device: a decoder on meta whose "text device" is meta too, told apart by identity
    split = TorchDecoder(lm, ImageHead(lm, shape.layout.image_ids), "meta", text_device="meta",
                         image_phase_ids=shape.layout.image_phase_ids)
    off = memory.peak(shape, memory.Setting(None, None, True), 1).weights
    assert off == _bytes(_decoder_tensors(split))
    assert 0.9e9 < peak.weights - off < 1.1e9  # ~1.2 GB of bf16 tables out, ~0.13 GB of image rows in


def test_7b_plans(shape_7b):
    """What the plan picks for the cards people own (CUDA), in its order, and what it refuses."""
    def chosen(budget):
        return memory.plan(shape_7b, budget=memory.parse_bytes(budget), budget_source="test", device="cuda").chosen

    big = chosen("80GB")
    assert (big.setting, big.tile_batch) == (memory.Setting(None, None), 4)
    # the targets: a 12 GB card (11 GB beside the CUDA context), an 8 GB card (7.5 GB)
    twelve = chosen("11GB")
    # the fastest that fits: int4 weights with a bf16 cache, the vocabulary and the codec on the CPU
    assert twelve.setting == memory.Setting("int4", None, True, True) and twelve.total <= 11e9
    eight = chosen("7.5GB")
    assert (eight.setting, eight.tile_batch) == (memory.Setting("int4", "int4", True, True), 1) and eight.total <= 7.5e9
    # the released VQ-8 on the device: 0.28 GB of float32 weights and ~0.8 GB of feature maps for a 512² tile,
    # which with the cache and the graphs' reserve would not fit 7.5 GB (so the 8 GB plan decodes tiles on the CPU)
    shape = memory.model_shape(shape_7b, torch.bfloat16)
    held, work = shape.codec
    assert 0.27e9 < held < 0.29e9 and 0.6e9 < work < 1.0e9
    assert memory.peak(shape, memory.Setting("int4", "int4", True), 1).total > 7.5e9
    with pytest.raises(memory.MemoryBudgetError, match=r"needs 7\.\d\d GB; give --max-memory 7\.\d\dGB"):
        chosen("1MB")
    # an explicit option is kept: nf4 needs an int8 cache and the vocabulary off the device to fit 11 GB
    nf4 = memory.plan(shape_7b, budget=11 * 10**9, budget_source="test", device="cuda", quantization="nf4",
                      quantization_given=True).chosen
    assert nf4.setting.quantization == "nf4" and nf4.total <= 11e9


def test_text_rows_off_the_device_decode_the_same_greedy_tokens(tiny_compact):
    """The vocabulary split (text embedded and scored on the "text device", the image phase's rows kept) against
    the whole tables on the device: the same greedy tokens through the host loop, the chained loop and SJD."""
    from pure_lite.torch_backend.decoder import TorchDecoder
    from pure_lite.torch_backend.load import load_components

    whole, split = load_components(tiny_compact), load_components(tiny_compact, text_device="cpu")
    layout = whole.layout
    assert split.new_decoder().vocab is not None and whole.new_decoder().vocab is None
    rng = np.random.default_rng(3)
    prompts = [prompt_ids(whole.tokenizer, layout, layout.encode_image(rng.integers(0, layout.codebook_size, (8, 8))))
               for _ in range(2)]

    def tokens(components, device_loop: bool, window: int = 0, fixed_shape: bool = False):
        loaded = components.new_decoder()
        decoder = TorchDecoder(loaded.lm, loaded.image_head, "cpu", device_loop=device_loop,
                               text_device="cpu" if loaded.vocab is not None else None,
                               image_phase_ids=layout.image_phase_ids, attend_bucket=16 if fixed_shape else None)
        decoder.graphs = fixed_shape  # off CUDA, _replay runs the would-be-captured body eagerly
        config = SamplingConfig(temperature=0, max_text_tokens=8, jacobi_window=window)
        gens = generate_batch(decoder, prompts, layout, TILE, config, [np.random.default_rng(i) for i in range(2)],
                              max_positions=components.max_positions)
        return [g.tokens for g in gens]

    # host loop, chained loop, SJD, then the fixed-shape steps CUDA graphs capture (text scored around them)
    for args in ((False, 0), (True, 0), (False, 3), (True, 3, True)):
        expected = tokens(whole, *args)
        assert all(np.array_equal(a, b) for a, b in zip(tokens(split, *args), expected))
        assert all(len(t) > 76 for t in expected)  # some text, then the 76-token image block and end of turn


def test_parse_bytes():
    assert memory.parse_bytes("8GB") == 8 * 10**9
    assert memory.parse_bytes("7.5GiB") == int(7.5 * 2**30)
    assert memory.parse_bytes("512 MB") == 512 * 10**6
    assert memory.parse_bytes(1234) == 1234
    for bad in ("eight", "8XB", "-1GB", "0"):
        with pytest.raises(ValueError):
            memory.parse_bytes(bad)


def test_cli_refuses_before_loading_and_prints_the_plan(tiny_compact, tmp_path, capsys, monkeypatch):
    """--max-memory 1MB: exit 2, one error line naming the smallest budget, nothing loaded; a budget that fits
    prints the plan's line and restores."""
    from PIL import Image

    from pure_lite import cli
    from pure_lite.torch_backend import load

    src = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(src)
    loads = []
    real = load.load_components
    monkeypatch.setattr(load, "load_components", lambda *a, **k: loads.append(1) or real(*a, **k))
    rc = cli.main(["restore", str(src), "-o", str(tmp_path / "out.png"), "--model", str(tiny_compact),
                   "--max-memory", "1MB", "-q"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "give --max-memory" in errors[0] and not loads, err
    assert not (tmp_path / "out.png").exists()
    rc = cli.main(["restore", str(src), "-o", str(tmp_path / "out.png"), "--model", str(tiny_compact),
                   "--max-memory", "4GB", "--target-size", "64", "--temperature", "0", "--max-text-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 0 and loads, err
    plan_lines = [line for line in err.splitlines() if line.startswith("memory plan: ")]
    assert len(plan_lines) == 1 and "of 4.00 GB (max_memory)" in plan_lines[0], err


def test_live_bytes_counts_what_is_alive_at_once():
    """The counter the codec's working memory comes from, on tensors whose sizes are known: a view shares its
    storage (counted once, kept alive by the view), a freed tensor stops counting, inputs made before do not."""
    from pure_lite.torch_backend.live_bytes import LiveBytes

    before = torch.ones(1000)  # 4 kB, made outside
    with LiveBytes() as live:
        x = torch.zeros(1000, 1000)  # 4 MB
        y = x * 2  # 8 MB alive
        head = y.view(-1)[:10]  # a view: y's storage stays
        del y
        z = x + before  # 12 MB alive: x, y (through head), z
        del x, z, head
        w = torch.zeros(500, 1000)  # 2 MB, the only one left
    assert live.peak == 12_000_000 and live.live == 2_000_000
    del w


def test_codec_memory_traced_on_meta_equals_a_real_run(tiny_compact):
    """The plan's codec figures, from the meta device, against the codec loaded on CPU running a real tile: the same
    weight bytes, and the same most-bytes-alive while it encodes and decodes the tile."""
    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.torch_backend.live_bytes import LiveBytes
    from pure_lite.torch_backend.load import load_vq

    shape = memory.model_shape(tiny_compact, torch.float32, tile=TILE)
    vq = load_vq(CheckpointFiles.locate(tiny_compact))
    assert shape.codec[0] == _bytes([*vq.parameters(), *vq.buffers()])
    codes = torch.randint(0, vq.config.codebook_size, (1, TILE // 8, TILE // 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LiveBytes() as decode:
        pixels = vq.decode(codes)
    with torch.no_grad(), LiveBytes() as encode:
        vq.encode(pixels)
    assert shape.codec[1] == max(decode.peak, encode.peak) > 0


def test_a_plan_with_the_codec_on_the_host_loads_it_there(tiny_compact, monkeypatch):
    """Restorer.from_pretrained loads what the plan chose: the vocabulary and the VQ codec on the CPU (stood in
    for on a CPU machine by a plan that chose them), and restores the same greedy image as the plain load."""
    from pure_lite import Restorer
    from pure_lite.torch_backend import memory as plan_module

    def plan_load(path, **kw):
        shape = plan_module.model_shape(path, torch.float32)
        chosen = plan_module.peak(shape, plan_module.Setting(None, None, True, True), 1)
        return plan_module.Plan(chosen, 10**10, "test", ())

    from pure_lite.torch_backend import load

    asked = []
    real = load.load_components
    monkeypatch.setattr(plan_module, "plan_load", plan_load)
    monkeypatch.setattr(load, "load_components", lambda *a, **k: asked.append(k) or real(*a, **k))
    planned = Restorer.from_pretrained(tiny_compact, backend="torch", max_memory="10GB")
    assert asked[0]["codec_device"] == "cpu" and asked[0]["text_device"] == "cpu"
    assert planned.components.new_decoder().vocab is not None
    plain = Restorer.from_pretrained(tiny_compact, backend="torch")
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    greedy = SamplingConfig(temperature=0, max_text_tokens=2)
    a = planned.restore(image, sampling=greedy, target_size=TILE)
    b = plain.restore(image, sampling=greedy, target_size=TILE)
    np.testing.assert_array_equal(a.tokens, b.tokens)
