"""Export a PURE checkpoint to a self-describing ONNX folder served by ``pure_lite.runtime``.

    OUT_DIR/
      decoder.onnx (+ decoder.onnx.data)   one graph for prefill and decode, KV cache as explicit I/O
      lm_head.onnx (+ .data)               hidden (N, hidden) -> logits (N, V): text steps
      image_head.onnx (+ .data)            hidden -> image_logits (N, codebook), image tokens in code order
      vq_encoder.onnx (+ .data)            pixels (B, 3, H, W) in [-1, 1] -> codes (B, H/8, W/8)
      vq_decoder.onnx (+ .data)            codes -> pixels in [-1, 1]
      tokenizer.json                       copied from the checkpoint
      pure_lite_manifest.json              dimensions, I/O names, token layout, sha256 of every file

Decoder I/O (fixed contract, deterministic names; see pure_lite.torch_backend.chameleon.ChameleonStep):
  inputs   input_ids (B, T) int64, attention_mask (B, S+T) int64, position_ids (B, T) int64,
           past_key_values.{i}.key / .value (B, heads, S, head_dim): the caller's whole cache buffer
  outputs  hidden (B, T, hidden) float32: the final-norm state of every new position (speculative
           decoding checks all of them; manifest ``"positions": "all"``),
           new_key_values.{i}.key / .value (B, heads, T, head_dim): the new tokens' keys and values
then one of the two heads turns the positions the caller needs, flattened to (N, hidden), into
logits. Inside an image every non-image id is masked anyway, so the image head (the 16384 image rows of lm_head) is exact there and skips
three quarters of the head's work; ONNX Runtime runs every node of a graph whatever outputs are
asked for, so the heads are separate graphs.
attention_mask marks which of the S cache slots are real positions, then the T new tokens.
The graph never concatenates or copies the cache: the runtime allocates it once and writes
the new keys and values into it. B, T and S are dynamic, so the same graph serves the
prompt, single steps, draft windows and any batch of rows (tiles, CFG). The decoder's weights always live in external
data (``decoder.onnx.data``), which has no 2 GB protobuf limit.

How the weights get there: by default the graphs are traced from weightless stand-ins of the
models (``stand_in``: the real config, fake tensors) and every weight is then streamed from the
checkpoint into the data files (``weight_stream``), so the export holds a chunk of one tensor at a
time rather than the model. ``streaming=False`` keeps the in-memory path: the float32 model loaded
in torch and traced with its weights, then ONNX Runtime's quantizer on the saved float graphs; it is
the reference the streamed export is tested and benchmarked against.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from pure_lite.checkpoint import CheckpointFiles, load_vq_state_dict, trained_image_size, trained_scale
from pure_lite.errors import PureLiteError
from pure_lite.manifest import write_manifest
from pure_lite.sampling import SamplingConfig
from pure_lite.tokens import GRID_PIXELS, TokenLayout

from .quantize import QuantizationConfig, quantize_graph, quantize_streamed

OPSET = 18
DECODER_FILE, VQ_ENCODER_FILE, VQ_DECODER_FILE = "decoder.onnx", "vq_encoder.onnx", "vq_decoder.onnx"
TEXT_HEAD_FILE, IMAGE_HEAD_FILE = "lm_head.onnx", "image_head.onnx"
LM_GRAPHS = (DECODER_FILE, TEXT_HEAD_FILE, IMAGE_HEAD_FILE)


def decoder_io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["hidden"] + [f"new_key_values.{n}" for n in kv])


@dataclass
class GraphSpec:
    """One graph to trace: the module, example inputs, I/O names and dynamic dimensions."""

    file: str
    module: object  # torch.nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic: dict


def decoder_spec(lm) -> GraphSpec:
    """``ChameleonStep`` with dynamic batch/new/past lengths, the past as one flat list."""
    import torch
    from torch.export import Dim

    from pure_lite.torch_backend.chameleon import ChameleonStep, kv_shape

    step = ChameleonStep(lm).eval()
    layers = lm.config.num_hidden_layers
    heads, head_dim = kv_shape(lm.config)
    b, t, p = 2, 3, 5  # example sizes: all distinct so no dimension is specialised by accident

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.step = step

        def forward(self, input_ids, attention_mask, position_ids, past):
            return self.step(input_ids, attention_mask, position_ids, *past)

    args = (
        torch.ones(b, t, dtype=torch.int64),
        torch.ones(b, p + t, dtype=torch.int64),
        torch.arange(p, p + t).expand(b, t).contiguous(),
        [torch.zeros(b, heads, p, head_dim, dtype=torch.float32) for _ in range(2 * layers)],
    )
    auto = Dim.AUTO
    dynamic = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
               "position_ids": {0: auto, 1: auto}, "past": [{0: auto, 2: auto}] * (2 * layers)}
    inputs, outputs = decoder_io_names(layers)
    return GraphSpec(DECODER_FILE, Flat().eval(), args, inputs, outputs, dynamic)


def head_specs(text_head, image_head, hidden_size: int) -> list[GraphSpec]:
    """The two heads: hidden (N, hidden) -> logits (N, V) and -> image_logits (N, codebook)."""
    import torch
    from torch.export import Dim

    hidden = torch.zeros((2, hidden_size))
    dims = {"hidden": {0: Dim.AUTO}}
    return [GraphSpec(TEXT_HEAD_FILE, text_head.eval(), (hidden,), ["hidden"], ["logits"], dims),
            GraphSpec(IMAGE_HEAD_FILE, image_head.eval(), (hidden,), ["hidden"], ["image_logits"], dims)]


def vq_specs(vq) -> list[GraphSpec]:
    """The VQ tokenizer as two graphs with dynamic batch and image size."""
    import torch
    from torch.export import Dim

    class Encode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vq = vq

        def forward(self, pixels):
            return self.vq.quantize.nearest(self.vq.quant_conv(self.vq.encoder(pixels)))

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vq = vq

        def forward(self, codes):
            return self.vq.decoder(self.vq.post_quant_conv(self.vq.quantize.lookup(codes))).clamp(-1, 1)

    auto = Dim.AUTO
    return [GraphSpec(VQ_ENCODER_FILE, Encode().eval(), (torch.zeros(1, 3, 48, 64),), ["pixels"], ["codes"],
                      {"pixels": {0: auto, 2: auto, 3: auto}}),
            GraphSpec(VQ_DECODER_FILE, Decode().eval(), (torch.zeros(1, 6, 8, dtype=torch.int64),), ["codes"],
                      ["pixels"], {"codes": {0: auto, 1: auto, 2: auto}})]


def trace(spec: GraphSpec, *, opset: int = OPSET, stand_in: bool = False):
    """``torch.onnx.export`` (dynamo) of ``spec`` to an optimized ONNXProgram, not yet saved.

    ``stand_in``: the module's weights are fake (``stand_in``); their initializers are left empty
    for ``weight_stream``, so the optimizer folds nothing into them (it cannot read them).
    """
    import torch

    from .weight_stream import unload_fake_weights

    with torch.no_grad():
        program = torch.onnx.export(spec.module, spec.args, None, dynamo=True, input_names=spec.inputs,
                                    output_names=spec.outputs, dynamic_shapes=spec.dynamic, opset_version=opset,
                                    optimize=not stand_in, verbose=False)
    if stand_in:
        unload_fake_weights(program.model)
        # the deduplication pass warns once per empty initializer; nothing is wrong
        logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)
        program.optimize()
    if spec.file == DECODER_FILE:
        _name_decoder_dims(program.model)
    return program


def _name_decoder_dims(model) -> None:
    """Give the exporter's symbolic dims (s12, 's3 + s7') readable names: batch, seq, cache_slots."""
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: [d.value if isinstance(d, ir.SymbolicDim) else None for d in v.shape] for v in graph.inputs}
    names = {inputs["input_ids"][0]: "batch", inputs["input_ids"][1]: "seq",
             inputs["past_key_values.0.key"][2]: "cache_slots"}
    pattern = re.compile(r"\bs\d+\b")
    for value in [*graph.inputs, *graph.outputs, *(out for node in graph for out in node.outputs)]:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(pattern.sub(lambda m: names.get(m.group(0), m.group(0)), d.value))
                if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape]
        value.shape = ir.Shape(dims)


def _layout_entry(layout: TokenLayout) -> dict:
    return {
        "tokenizer": "tokenizer.json",
        "image_ids": "rebuilt from the IMGIMG names in tokenizer.json (pure_lite.tokens.TokenLayout)",
        "vocab_size": layout.vocab_size,
        "codebook_size": layout.codebook_size,
        "bos": layout.bos, "image_start": layout.image_start, "image_end": layout.image_end,
        "row_end": layout.row_end, "end_of_turn": layout.end_of_turn,
        "grid_ids": {str(k): v for k, v in sorted(layout.grid_ids.items())},
    }


def export_onnx(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quantization: Literal["int8", "int4"] | None = None,
    block_size: int = QuantizationConfig.block_size,
    image_size: int | None = None,
    opset: int = OPSET,
    overwrite: bool = False,
    progress: bool | Callable[[str], None] = True,
    streaming: bool = True,
) -> Path:
    """Export ``model_dir`` to ``out_dir``; the folder appears complete or not at all.

    ``image_size`` is the output side the model was trained for, recorded in the manifest as the
    runtime's default ``target_size``; None takes the checkpoint's own (a model trained by pure-lite
    records it in config.json), else the released PURE's 512. ``progress=True`` prints the stages
    ("[k/4] what") and a bar over the weights; a callable receives each stage message instead, and
    the weights' progress as "i/n tensors" messages (what the command line's stage bar shows).

    ``streaming`` (the default) traces weightless stand-ins and streams each weight from the
    checkpoint's shards into the graphs' data files: peak memory is about the largest single tensor
    and its conversions, not the model. ``streaming=False`` is the in-memory path kept as the
    reference the streamed export is tested and benchmarked against: the float32 model is loaded in
    torch and traced with its weights, and ONNX Runtime's quantizer rewrites the saved float graphs
    (about 3x the float32 weights at peak).
    """
    if image_size is not None and (image_size <= 0 or image_size % GRID_PIXELS):
        raise ValueError(f"image_size must be a positive multiple of {GRID_PIXELS}, got {image_size}")
    qconfig = QuantizationConfig(weights=quantization, block_size=block_size)
    say = progress if callable(progress) else print if progress else (lambda message: None)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PureLiteError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    files = CheckpointFiles.locate(model_dir)
    config = files.read_config()
    if image_size is None:
        image_size = trained_image_size(config)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, config["vocab_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        if streaming:
            _stream_graphs(files, work, layout, qconfig, opset=opset, say=say,
                           progress=progress)
        else:
            _in_memory_graphs(files, work, layout, qconfig, opset=opset, say=say)
        shutil.copyfile(files.tokenizer, work / "tokenizer.json")
        say("[4/4] writing the manifest (sha256 of every file)")
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        _, outputs = decoder_io_names(config["num_hidden_layers"])
        data = {
            "format": "pure-lite-onnx",
            "created_by": "pure-lite " + _version(),
            "model": {
                "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
                "num_hidden_layers": config["num_hidden_layers"], "num_attention_heads": config["num_attention_heads"],
                "num_key_value_heads": heads, "head_dim": config["hidden_size"] // config["num_attention_heads"],
                "max_position_embeddings": config["max_position_embeddings"], "kv_dtype": "float32",
                "kv_contract": "split-cache-v1", "image_size": image_size, "scale": trained_scale(config),
            },
            "graphs": {
                "decoder": {"file": DECODER_FILE, "positions": "all",
                            "inputs": decoder_io_names(config["num_hidden_layers"])[0], "outputs": outputs},
                "lm_head": {"file": TEXT_HEAD_FILE, "inputs": ["hidden"], "outputs": ["logits"]},
                "image_head": {"file": IMAGE_HEAD_FILE, "inputs": ["hidden"], "outputs": ["image_logits"],
                               "rows": "image token ids in code order (TokenLayout.image_ids)"},
                "vq_encoder": {"file": VQ_ENCODER_FILE, "inputs": ["pixels"], "outputs": ["codes"], "downsample": 8},
                "vq_decoder": {"file": VQ_DECODER_FILE, "inputs": ["codes"], "outputs": ["pixels"]},
            },
            "tokens": _layout_entry(layout),
            "sampling": asdict(SamplingConfig()),
            "quantization": qconfig.describe(),
            "opset": opset,
        }
        names = sorted(p.name for p in work.iterdir() if p.is_file())
        write_manifest(work, data, names)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        say(f"done in {time.perf_counter() - started:.1f} s: {out} ({_size_mb(out):.1f} MB)")
        return out
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _stream_graphs(files: CheckpointFiles, work: Path, layout: TokenLayout, qconfig: QuantizationConfig, *,
                   opset: int, say, progress: bool | Callable[[str], None]) -> None:
    """Trace weightless stand-ins, then fill their weights tensor by tensor (``weight_stream``)."""
    from pure_lite.torch_backend.chameleon import UNUSED_WEIGHT_PREFIXES, TextHead

    from . import stand_in
    from .tensors import LoadedTensors, SafetensorsTensors
    from .weight_stream import Progress, plan_fills, write_graph

    lm_tensors = SafetensorsTensors.language_model(files)
    vq_tensors = (SafetensorsTensors([files.vq]) if files.vq.suffix == ".safetensors"
                  else LoadedTensors(load_vq_state_dict(files.vq, mmap=True)))
    say(f"[1/4] tracing the decoder, head and VQ graphs of {files.root} from weightless stand-ins (opset {opset})")
    lm = stand_in.language_model(files)
    keys = stand_in.checkpoint_keys(lm, lm_tensors, optional=UNUSED_WEIGHT_PREFIXES)
    image_head, derived = stand_in.image_head(lm, layout.image_ids, keys)
    vq = stand_in.vq_model(vq_tensors)
    vq_keys = stand_in.checkpoint_keys(vq, vq_tensors)
    specs = [(decoder_spec(lm), keys, lm_tensors),
             *((spec, keys, lm_tensors) for spec in head_specs(TextHead(lm), image_head, lm.config.hidden_size)),
             *((spec, vq_keys, vq_tensors) for spec in vq_specs(vq))]
    traced = [trace(spec, opset=opset, stand_in=True).model for spec, _, _ in specs]
    jobs = []  # quantized only once every graph is traced: ONNX Runtime's quantizer turns on INFO logging
    for (spec, spec_keys, tensors), model in zip(specs, traced):
        fills = plan_fills(model, stand_in.sources(spec.module, spec_keys, derived), tensors)
        if spec.file in LM_GRAPHS:
            quantize_streamed(model, fills, qconfig)
        jobs.append((work / spec.file, model, fills, tensors))
    count = sum(len(fills) for _, _, fills, _ in jobs)
    nbytes = sum(fill.source.nbytes(tensors) for _, _, fills, tensors in jobs for fill in fills)
    weights = "float32" if qconfig.weights is None else qconfig.weights
    say(f"[2/4] streaming {count} tensors ({nbytes / 1e9:.2f} GB) into the graphs' data files ({weights})")
    bar = Progress(count, nbytes, progress is True, say=say if callable(progress) else None)
    try:
        for path, model, fills, tensors in jobs:
            write_graph(model, fills, tensors, path, bar)
    finally:
        bar.close()
    say("[3/4] copying the tokenizer")


def _in_memory_graphs(files: CheckpointFiles, work: Path, layout: TokenLayout, qconfig: QuantizationConfig, *,
                      opset: int, say) -> None:
    """The reference path: the float32 model in torch, traced with its weights; ORT's quantizer on the saved graphs."""
    import torch

    from pure_lite.torch_backend.chameleon import SPLIT_ATTENTION, ImageHead, TextHead, load_language_model
    from pure_lite.torch_backend.load import load_vq

    say(f"[1/4] loading {files.root}")
    lm = load_language_model(files, attn_implementation=SPLIT_ATTENTION, dtype=torch.float32)
    say(f"[2/4] exporting the decoder and head graphs (opset {opset})")
    float_dir = work if qconfig.weights is None else work / "float"
    float_dir.mkdir(exist_ok=True)
    specs = [decoder_spec(lm),
             *head_specs(TextHead(lm), ImageHead(lm, layout.image_ids), lm.config.hidden_size)]
    for spec in specs:
        trace(spec, opset=opset).save(float_dir / spec.file, external_data=True)
    if qconfig.weights is not None:
        del lm, specs
        gc.collect()
        for name in LM_GRAPHS:
            say(f"      quantizing {name} weights to {qconfig.weights} (block {qconfig.block_size})")
            quantize_graph(float_dir / name, work / name, qconfig)
        shutil.rmtree(float_dir)
    say("[3/4] exporting the VQ encoder and decoder graphs")
    for spec in vq_specs(load_vq(files)):
        trace(spec, opset=opset).save(work / spec.file, external_data=True)


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def _version() -> str:
    from pure_lite import __version__

    return __version__

