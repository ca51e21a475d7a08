"""The streaming export (the default) against the in-memory one, its pieces against independent readers.

The export fixtures of conftest are streamed. The reference is ``export_onnx(streaming=False)``: the
float32 model loaded by transformers, traced with its weights, and for int8/int4 ONNX Runtime's
quantizer run on those float graphs (``quantize_graph``, the in-memory path's own step).
"""

import collections
import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import TARGET
from pure_lite.export import export_onnx, onnx_export, weight_stream
from pure_lite.export.quantize import QuantizationConfig, quantize_graph
from pure_lite.export.tensors import SafetensorsTensors
from test_export import _session, _teacher_forced_logits

from pure_lite import Restorer, SamplingConfig
from pure_lite.checkpoint import CheckpointFiles
from pure_lite.errors import CheckpointError
from pure_lite.manifest import MANIFEST_FILE, Manifest

LM_GRAPHS = ("decoder.onnx", "lm_head.onnx", "image_head.onnx")


@pytest.fixture(scope="module")
def in_memory(request, tmp_path_factory):
    """``in_memory(layout)``: the in-memory float export of a tiny checkpoint, made once."""
    made = {}

    def get(layout):
        if layout not in made:
            out = tmp_path_factory.mktemp(f"in_memory_{layout}") / "onnx"
            made[layout] = export_onnx(request.getfixturevalue(f"tiny_{layout}"), out, block_size=32,
                                       progress=False, streaming=False)
        return made[layout]

    return get


def _ops(path):
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node), {o.domain: o.version for o in model.opset_import}


@pytest.mark.parametrize("layout", ["compact", "pure"])
def test_streamed_float_export_decodes_like_the_in_memory_one(request, in_memory, layout, rgb_image):
    streamed, reference = request.getfixturevalue(f"export_{layout}_float"), in_memory(layout)
    for graph in LM_GRAPHS:  # the same graph: the optimizer's weight Transposes are folded in both
        assert _ops(streamed / graph) == _ops(reference / graph), graph
    prompt, feed = list(range(10, 40)), np.arange(30)[:, None] + 50
    a, b = (_teacher_forced_logits(out, prompt, feed) for out in (streamed, reference))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    hidden = np.random.default_rng(0).normal(size=(2, Manifest.load(streamed).model["hidden_size"])).astype(np.float32)
    for graph in ("lm_head.onnx", "image_head.onnx"):
        x, y = (_session(out / graph).run(None, {"hidden": hidden})[0] for out in (streamed, reference))
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    greedy = SamplingConfig(temperature=0.0, cfg_scale=0.8, max_text_tokens=8)
    runs = [Restorer.from_pretrained(out).restore(rgb_image, sampling=greedy, target_size=TARGET)
            for out in (streamed, reference)]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_allclose(np.asarray(runs[0].image, np.int16), np.asarray(runs[1].image, np.int16), atol=1)


def _quantized_tensors(path) -> collections.Counter:
    """sha256 of every quantized or float16 weight (with its scales), as a multiset: names differ between paths."""
    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    found = collections.Counter()
    for node in model.graph.node:
        names = []
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            names = [name for name in node.input if name in init]
        elif node.op_type == "Gather" and node.input[0] in init \
                and init[node.input[0]].data_type == onnx.TensorProto.FLOAT16:
            names = [node.input[0]]
        if names:
            digest = hashlib.sha256()
            for name in names:
                t = init[name]
                digest.update(f"{list(t.dims)} {t.data_type}".encode())
                digest.update(onnx.numpy_helper.to_array(t).tobytes() if t.data_type != onnx.TensorProto.INT4
                              else t.raw_data)
            found[(node.op_type, digest.hexdigest())] += 1
    return found


@pytest.mark.parametrize("layout, quant", [("compact", "int8"), ("compact", "int4"), ("pure", "int8")])
def test_streamed_quantized_export_holds_the_in_memory_bytes(request, in_memory, tmp_path, layout, quant):
    """The in-memory path quantizes its float graphs with ``quantize_graph``: done here on its float export.

    The pure layout's embedding (73728 x 32) is large enough for int8's float16 table; the compact one is not.
    """
    if layout == "compact":
        streamed = request.getfixturevalue(f"export_compact_{quant}")
    else:
        streamed = export_onnx(request.getfixturevalue("tiny_pure"), tmp_path / "streamed", quantization=quant,
                               block_size=32, progress=False)
    reference = tmp_path / "in_memory"
    reference.mkdir()
    config = QuantizationConfig(weights=quant, block_size=32)
    for graph in LM_GRAPHS:
        quantize_graph(in_memory(layout) / graph, reference / graph, config)
        assert _ops(streamed / graph) == _ops(reference / graph), graph
        got, want = _quantized_tensors(streamed / graph), _quantized_tensors(reference / graph)
        assert got == want and sum(want.values()) >= 1, graph
    expected = {"MatMulNBits": 2 * 7}  # two layers of seven matrices
    if quant == "int4":
        expected["GatherBlockQuantized"] = 1
    elif layout == "pure":
        expected["Gather"] = 1  # the float16 embedding
    kinds = collections.Counter(kind for kind, _ in _quantized_tensors(reference / "decoder.onnx").elements())
    assert kinds == collections.Counter(expected)
    sessions = {out: (_session(out / "decoder.onnx"), _session(out / "lm_head.onnx")) for out in (streamed, reference)}
    ids = np.arange(10, 20)[None]
    past = [np.zeros((1, 4, 0, 8), np.float32)] * 4
    feeds = dict(zip([i.name for i in sessions[streamed][0].get_inputs()],
                     [ids, np.ones((1, 10), np.int64), np.arange(10)[None], *past]))
    logits = [s[1].run(None, {"hidden": s[0].run(None, feeds)[0][:, -1]})[0] for s in sessions.values()]
    np.testing.assert_array_equal(logits[0], logits[1])


def _files(folder):
    return {name: entry["sha256"] for name, entry in json.loads((folder / MANIFEST_FILE).read_text())["files"].items()}


def test_chunked_streaming_writes_the_same_bytes(tiny_compact, export_compact_int4, tmp_path, monkeypatch):
    """A tensor read and encoded a few rows at a time is stored exactly as when read whole."""
    monkeypatch.setattr(weight_stream, "CHUNK_BYTES", 300)  # rows of 32 float32: 2 rows a chunk
    out = export_onnx(tiny_compact, tmp_path / "chunked", quantization="int4", block_size=32, progress=False)
    assert _files(out) == _files(export_compact_int4)


def test_rows_and_transposes_read_in_pieces_equal_numpy(tiny_pure, pure_layout, monkeypatch):
    from safetensors.torch import load_file

    files = CheckpointFiles.locate(tiny_pure)
    tensors = SafetensorsTensors.language_model(files)
    reference = {}
    for path in files.root.glob("model*.safetensors"):
        reference.update(load_file(str(path)))
    assert sorted(tensors.names()) == sorted(reference)
    for name in tensors.names():
        np.testing.assert_array_equal(tensors.read(name).numpy(), reference[name].numpy())
    head = reference["lm_head.weight"].numpy()
    rows = np.array(pure_layout.image_ids)
    assert len(np.flatnonzero(np.diff(rows) != 1)) == 1  # two runs of ids: both are read
    monkeypatch.setattr(weight_stream, "CHUNK_BYTES", 1000)
    source = weight_stream.Source("lm_head.weight", rows=rows, layout=(("transpose", (1, 0)),))
    assert source.rows_axis(tensors) == 1
    np.testing.assert_array_equal(source.load(tensors, 0, len(rows)), head[rows].T)
    np.testing.assert_array_equal(source.load(tensors, 8000, 8400), head[rows[8000:8400]].T)


def test_bfloat16_checkpoints_are_read_in_their_own_dtype(tmp_path):
    from safetensors.torch import save_file

    weight = torch.randn(6, 4).to(torch.bfloat16)
    save_file({"w": weight, "b": torch.arange(3, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    tensors = SafetensorsTensors([tmp_path / "model.safetensors"])
    assert tensors.read("w").dtype == torch.bfloat16 and tensors.nbytes("w") == 48
    assert torch.equal(tensors.read("w", 2, 5), weight[2:5])
    source = weight_stream.Source("w", layout=(("transpose", (1, 0)), ("unsqueeze", (0,))))
    assert source.shape(tensors) == (1, 4, 6)
    np.testing.assert_array_equal(source.load(tensors, 0, 6), weight.float().numpy().T[None])


def test_an_interrupted_export_leaves_the_earlier_one_servable(tiny_compact, export_compact_float, tmp_path,
                                                                monkeypatch, capsys):
    out = tmp_path / "onnx"
    shutil.copytree(export_compact_float, out)
    load = weight_stream.Source.load
    calls = []

    def interrupted(self, *args):
        calls.append(self.name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return load(self, *args)

    monkeypatch.setattr(weight_stream.Source, "load", interrupted)
    monkeypatch.setattr(onnx_export, "vq_specs", lambda vq: [])  # not needed to stop half way: spare the time
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_compact, out, quantization="int8", block_size=32, overwrite=True)
    assert "19/" in capsys.readouterr().err  # the bar counted the tensors written before the interrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no half-written folder left
    assert Manifest.load(out).quantization == "float"  # the earlier export, whole


def test_a_missing_weight_stops_the_export_before_writing(tiny_compact, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_compact, ckpt)
    shard = next(ckpt.glob("model*.safetensors"))
    state = load_file(str(shard))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        export_onnx(ckpt, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_initializer_with_no_checkpoint_tensor_is_an_error(tiny_compact):
    import onnx_ir as ir

    weight = ir.Value(name="step.extra.weight", shape=ir.Shape([2, 2]), type=ir.TensorType(ir.DataType.FLOAT))
    x = ir.Value(name="x", shape=ir.Shape([2, 2]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("MatMul", [x, weight])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[], name="g")
    graph.initializers[weight.name] = weight
    tensors = SafetensorsTensors.language_model(CheckpointFiles.locate(tiny_compact))
    with pytest.raises(weight_stream.ExportError, match="step.extra.weight"):
        weight_stream.plan_fills(ir.Model(graph, ir_version=10), {}, tensors)


def test_a_tied_lm_head_is_read_from_the_embedding(tiny_compact, tmp_path):
    """With tie_word_embeddings the checkpoint holds one tensor for both; the head reads it under its own name."""
    from pure_lite.export import stand_in
    from safetensors.torch import load_file, save_file

    from pure_lite.torch_backend.chameleon import UNUSED_WEIGHT_PREFIXES, TextHead

    ckpt = tmp_path / "tied"
    shutil.copytree(tiny_compact, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    shard = next(ckpt.glob("model*.safetensors"))
    state = load_file(str(shard))
    del state["lm_head.weight"]
    save_file(state, str(shard), metadata={"format": "pt"})
    files = CheckpointFiles.locate(ckpt)
    tensors = SafetensorsTensors.language_model(files)
    lm = stand_in.language_model(files)
    keys = stand_in.checkpoint_keys(lm, tensors, optional=UNUSED_WEIGHT_PREFIXES)
    assert stand_in.sources(TextHead(lm), keys) == {"lm_head.weight": weight_stream.Source("model.embed_tokens.weight")}
