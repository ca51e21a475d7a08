"""Export a PURE checkpoint to a self-describing ONNX folder served by ``pure_lite.runtime``.

    OUT_DIR/
      decoder.onnx (+ decoder.onnx.data)   one graph for prefill and decode, KV cache as explicit I/O
      lm_head.onnx (+ .data)               hidden (N, hidden) -> logits (N, V): text steps
      image_head.onnx (+ .data)            hidden -> image_logits (N, codebook), image tokens in code order
      vq_encoder.onnx                      pixels (B, 3, H, W) in [-1, 1] -> codes (B, H/8, W/8)
      vq_decoder.onnx                      codes -> pixels in [-1, 1]
      tokenizer.json                       copied from the checkpoint
      pure_lite_manifest.json              dimensions, I/O names, token layout, sha256 of every file

Decoder I/O (fixed contract, deterministic names; see pure_lite.lm.ChameleonStep):
  inputs   input_ids (B, T) int64, attention_mask (B, S+T) int64, position_ids (B, T) int64,
           past_key_values.{i}.key / .value (B, heads, S, head_dim): the caller's whole cache buffer
  outputs  hidden (B, T, hidden) float32: the final-norm state of every new position (speculative
           decoding checks all of them; manifest ``"positions": "all"``),
           new_key_values.{i}.key / .value (B, heads, T, head_dim): the new tokens' keys and values
then one of the two heads turns the positions the caller needs, flattened to (N, hidden), into logits. Inside an image every non-image id is
masked anyway, so the image head (the 16384 image rows of lm_head) is exact there and skips
three quarters of the head's work; ONNX Runtime runs every node of a graph whatever outputs are
asked for, so the heads are separate graphs.
attention_mask marks which of the S cache slots are real positions, then the T new tokens.
The graph never concatenates or copies the cache: the runtime allocates it once and writes
the new keys and values into it. B, T and S are dynamic, so the same graph serves the
prompt, single steps, draft windows and any batch of rows (tiles, CFG). The decoder's weights always live in external
data (``decoder.onnx.data``), which has no 2 GB protobuf limit.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Literal

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.components import PURE_IMAGE_SIZE
from pure_lite.errors import PureLiteError
from pure_lite.manifest import write_manifest
from pure_lite.sampling import SamplingConfig
from pure_lite.tokens import GRID_PIXELS, TokenLayout

from .quantize import QuantizationConfig, quantize_graph

OPSET = 18
DECODER_FILE, VQ_ENCODER_FILE, VQ_DECODER_FILE = "decoder.onnx", "vq_encoder.onnx", "vq_decoder.onnx"
TEXT_HEAD_FILE, IMAGE_HEAD_FILE = "lm_head.onnx", "image_head.onnx"
LM_GRAPHS = (DECODER_FILE, TEXT_HEAD_FILE, IMAGE_HEAD_FILE)


def decoder_io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["hidden"] + [f"new_key_values.{n}" for n in kv])


def _rename_dims(path: Path, names: dict[str, str]) -> None:
    """Give the exporter's symbolic dims (s12, 's3 + s7') readable names: batch, seq, cache_slots."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    pattern = re.compile(r"\bs\d+\b")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names.get(m.group(0), m.group(0)), dim.dim_param)
    onnx.save_model(model, str(path))


def _symbols(path: Path) -> dict[str, list[str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.input}


def export_decoder(lm, path: Path, *, opset: int = OPSET) -> None:
    """Trace ``ChameleonStep`` with dynamic batch/new/past lengths into ``path`` (+ external data)."""
    import torch
    from torch.export import Dim

    from pure_lite.lm import ChameleonStep, kv_shape

    step = ChameleonStep(lm).eval()
    layers = lm.config.num_hidden_layers
    heads, head_dim = kv_shape(lm.config)
    dtype = lm.dtype
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
        [torch.zeros(b, heads, p, head_dim, dtype=dtype) for _ in range(2 * layers)],
    )
    auto = Dim.AUTO
    dynamic = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
               "position_ids": {0: auto, 1: auto}, "past": [{0: auto, 2: auto}] * (2 * layers)}
    inputs, outputs = decoder_io_names(layers)
    with torch.no_grad():
        torch.onnx.export(Flat().eval(), args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                          dynamic_shapes=dynamic, opset_version=opset, external_data=True, verbose=False)
    sym = _symbols(path)
    _rename_dims(path, {sym["input_ids"][0]: "batch", sym["input_ids"][1]: "seq",
                        sym["past_key_values.0.key"][2]: "cache_slots"})


def export_heads(lm, image_ids, text_path: Path, image_path: Path, *, opset: int = OPSET) -> None:
    """The two heads as graphs: hidden (N, hidden) -> logits (N, V) and -> image_logits (N, codebook)."""
    import torch
    from torch.export import Dim

    from pure_lite.lm import ImageHead, TextHead

    hidden = torch.zeros((2, lm.config.hidden_size), dtype=lm.dtype)
    dims = {0: Dim.AUTO}
    for module, path, output in ((TextHead(lm), text_path, "logits"), (ImageHead(lm, image_ids), image_path, "image_logits")):
        with torch.no_grad():
            torch.onnx.export(module.eval(), (hidden,), str(path), dynamo=True, input_names=["hidden"],
                              output_names=[output], opset_version=opset, external_data=True,
                              dynamic_shapes={"hidden": dims}, verbose=False)


def export_vq(vq, encoder_path: Path, decoder_path: Path, *, opset: int = OPSET) -> None:
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
    with torch.no_grad():
        torch.onnx.export(Encode().eval(), (torch.zeros(1, 3, 48, 64),), str(encoder_path), dynamo=True,
                          input_names=["pixels"], output_names=["codes"], opset_version=opset,
                          dynamic_shapes={"pixels": {0: auto, 2: auto, 3: auto}}, verbose=False)
        torch.onnx.export(Decode().eval(), (torch.zeros(1, 6, 8, dtype=torch.int64),), str(decoder_path),
                          dynamo=True, input_names=["codes"], output_names=["pixels"], opset_version=opset,
                          dynamic_shapes={"codes": {0: auto, 1: auto, 2: auto}}, verbose=False)


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
    image_size: int = PURE_IMAGE_SIZE,
    opset: int = OPSET,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Export ``model_dir`` to ``out_dir``; the folder appears complete or not at all.

    ``image_size`` is the output side the model was trained for, recorded in the manifest as the
    runtime's default ``target_size``. Peak memory is about the float model in torch plus one float copy of the decoder
    graph (during quantization, the float graph and its quantized copy).
    """
    import torch

    from pure_lite.lm import SPLIT_ATTENTION, load_language_model
    from pure_lite.torch_backend import load_vq

    if image_size <= 0 or image_size % GRID_PIXELS:
        raise ValueError(f"image_size must be a positive multiple of {GRID_PIXELS}, got {image_size}")
    qconfig = QuantizationConfig(weights=quantization, block_size=block_size)
    say = progress or (lambda message: None)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PureLiteError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    files = CheckpointFiles.locate(model_dir)
    config = files.read_config()
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, config["vocab_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        say(f"[1/4] loading {files.root}")
        lm = load_language_model(files, attn_implementation=SPLIT_ATTENTION, dtype=torch.float32)
        say(f"[2/4] exporting the decoder and head graphs (opset {opset})")
        float_dir = work if qconfig.weights is None else work / "float"
        float_dir.mkdir(exist_ok=True)
        export_decoder(lm, float_dir / DECODER_FILE, opset=opset)
        export_heads(lm, layout.image_ids, float_dir / TEXT_HEAD_FILE, float_dir / IMAGE_HEAD_FILE, opset=opset)
        if qconfig.weights is not None:
            del lm
            gc.collect()
            for name in LM_GRAPHS:
                say(f"      quantizing {name} weights to {qconfig.weights} (block {qconfig.block_size})")
                quantize_graph(float_dir / name, work / name, qconfig)
            shutil.rmtree(float_dir)
        say("[3/4] exporting the VQ encoder and decoder graphs")
        export_vq(load_vq(files), work / VQ_ENCODER_FILE, work / VQ_DECODER_FILE, opset=opset)
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
                "kv_contract": "split-cache-v1", "image_size": image_size,
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


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def _version() -> str:
    from pure_lite import __version__

    return __version__

