"""The memory plan: before any weight is read, the peak of each way to load a checkpoint, and the fastest that fits.

A configuration is the weights' format (the model's dtype, torchao int4, bitsandbytes nf4/int8), the KV
cache's (the model's dtype, int8, int4) and the tile batch. Its peak on the device is

- **weights**, counted tensor by tensor the way the backend stores them: the model is built from
  config.json on the meta device (no weight is read) and joined as ``fuse_projections`` joins it; a linear
  int4 can pack (``quantize._int4_fits``) counts torchao's tinygemm layout, a linear bitsandbytes converts
  counts its packed weight and scales, everything else (embeddings, ``lm_head``, norms) its elements times the
  dtype's size; plus the decoder's own copies (the image rows of ``lm_head``, the joined qk-norm gains). The
  Chameleon VQ-VAE transformers builds counts only under bitsandbytes (``placement.py`` leaves it on the host);
- **the KV cache**: ``kv_cache.kv_bytes`` of the two groups ``generate.cache_sizes`` sizes for a tile of the
  model's side with the default sampling (the one count the cache itself is checked against);
- **the step's workspace**: an estimate, the prefill's activations (the widest call) plus a one-layer
  dequantized span for a quantized cache and a fixed reserve for CUDA graphs and the allocator; the GPU
  benchmark (``benchmarks/gpu_decode.py``) compares the whole prediction with ``max_memory_allocated``;
- **the VQ codec**, unless the setting keeps it on the CPU: its weights as loaded, and the most a tile's
  decode or encode holds at once (run on the meta device, ``live_bytes.py``), beside the cache, which stays
  allocated for the next tile: the larger of it and the workspace counts;
- **loading** (``placement.py``: one layer at a time): an upper bound on its transient beyond the finished
  weights, before any cache exists; the peak is the larger of it and cache plus workspace.

Weights and KV are exact on CPU for every format CPU can load (``tests/test_memory_plan.py`` sums the loaded
tensors); int4 and nf4/int8 need CUDA to quantize, so their bytes come from the same per-tensor rules only.

The order configurations are tried in (``candidates``), by the H200's measurements (docs/gpu.md): the model's
own dtype first (the weights as trained; 8.7 ms per step), then int4 weights (7.5 ms, 4-bit weights), then
int4 with an int8 cache, then with an int4 cache (each a little more arithmetic per step for half the KV);
each is tried again with the VQ codec on the CPU before the next (18 s per 512² tile on a 2-core CPU, measured
by ``benchmarks/codec_cpu.py``, against a quantized cache's dequantized span on every step: ~7 GB more memory
traffic per step of a 512² tile of the 7B, ~30 s per tile at a consumer card's 1 TB/s, estimated); inside
each, the tile batch halves before the next, slower or lossier setting is tried (a smaller batch only costs
throughput on photos of several tiles, and a tile's result does not depend on its batch).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from ..checkpoint import CheckpointFiles, load_vq_state_dict, trained_image_size
from ..errors import PureLiteError
from ..generate import cache_sizes
from ..prompt import TextTokenizer, prompt_ids
from ..safetensors_header import read_header
from ..sampling import SamplingConfig
from ..tokens import LATENT_STRIDE, TokenLayout
from .chameleon import chameleon_config, kv_shape
from .decoder import PREFILL_CHUNK
from .kv_cache import KVKind, kv_bytes
from .placement import HOST_ONLY
from .quantize import INT4_GROUP, _int4_fits, check_int4

# what CUDA graphs' private pool, the allocator's rounding and the sampler's buffers take beyond the prefill's
# activations: an estimate, checked by the GPU benchmark
RESERVE_BYTES = 512 * 2**20
BNB_BLOCK = 64  # bitsandbytes' 4-bit blocksize: one float32 absmax per 64 weights (no double quantization)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MemoryBudgetError(PureLiteError, ValueError):
    """No configuration fits the memory budget (or the one asked for does not): nothing was loaded."""


def parse_bytes(text: str | int) -> int:
    """'8GB' (10^9), '7.5GiB' (2^30), '512MB', or a number of bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"max_memory must be a size like 8GB, 7.5GiB or 512MB, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"max_memory must be positive, got {text!r}")
    return value


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class Setting:
    """One way to load: the weights' format (None: the model's dtype) and the KV cache's (None: the model's dtype)."""

    quantization: Literal["nf4", "int8", "int4"] | None
    kv_cache: KVKind | None
    text_rows_off_device: bool = False  # the embedding and lm_head on the CPU but the image phase's rows (vocab_rows.py)
    codec_on_host: bool = False  # the VQ codec encodes and decodes tiles on the CPU

    def describe(self) -> str:
        weights = {None: "unquantized", "int4": "int4 (torchao)", "nf4": "nf4", "int8": "int8 (bitsandbytes)"}
        text = ", vocabulary on the CPU but the image rows" if self.text_rows_off_device else ""
        codec = ", VQ codec on the CPU" if self.codec_on_host else ""
        return f"{weights[self.quantization]} weights, {self.kv_cache or 'model-dtype'} KV cache{text}{codec}"


@dataclass(frozen=True)
class Peak:
    """A configuration's predicted bytes on the device."""

    setting: Setting
    tile_batch: int
    dtype: torch.dtype
    weights: int
    kv: int
    workspace: int
    loading: int = 0  # beyond the weights while placement.py moves one layer in (no cache yet)
    codec: int = 0  # the VQ codec's weights on the device
    codec_work: int = 0  # what encoding or decoding a tile holds on the device (the decoder's cache stays)

    @property
    def total(self) -> int:
        return self.weights + self.codec + max(self.kv + max(self.workspace, self.codec_work), self.loading)

    def describe(self) -> str:
        return f"{self.setting.describe()}, tile batch {self.tile_batch}"


@dataclass(frozen=True)
class Plan:
    """The chosen configuration and why."""

    chosen: Peak
    budget: int
    budget_source: str  # "max_memory" or "free CUDA memory"
    passed_over: tuple[Peak, ...]  # faster configurations that did not fit

    def line(self) -> str:
        # the fastest configuration tried, and the closest faster setting (at the smallest batch)
        over = [self.passed_over[0]] if self.passed_over else []
        over += [p for p in self.passed_over if p.tile_batch == 1 and p.setting != self.chosen.setting][-1:]
        why = "the fastest configuration" if not over else "; ".join(
            f"faster: {p.describe()} needs {gb(p.total)}" for p in dict.fromkeys(over))
        return (f"memory plan: {self.chosen.describe()}; predicted peak {gb(self.chosen.total)} (weights "
                f"{gb(self.chosen.weights)}, KV {gb(self.chosen.kv)}, workspace ~{gb(self.chosen.workspace)}"
                f"{f', VQ codec {gb(self.chosen.codec)} + ~{gb(self.chosen.codec_work)} per tile' if self.chosen.codec else ''}) of "
                f"{gb(self.budget)} ({self.budget_source}); {why}")


class ModelShape:
    """What the plan needs of a checkpoint: its model built on the meta device, its layout and prompt length."""

    def __init__(self, path, dtype: torch.dtype, tile: int | None = None):
        from transformers import ChameleonForConditionalGeneration

        from .layers import fuse_projections

        files = CheckpointFiles.locate(path)
        self.config_dict = files.read_config()
        self.config = chameleon_config(files)
        self.dtype = dtype
        with torch.device("meta"):
            self.lm = ChameleonForConditionalGeneration._from_config(self.config, dtype=dtype)
            self.unjoined = ChameleonForConditionalGeneration._from_config(self.config, dtype=dtype)
        fuse_projections(self.lm)
        self.layout = TokenLayout.from_tokenizer_file(files.tokenizer, vocab_size=self.config_dict["vocab_size"])
        self.tile = tile or trained_image_size(self.config_dict)  # restore's tiles: the side it was trained at
        side = self.tile // LATENT_STRIDE
        lq_block = self.layout.encode_image(np.zeros((side, side), np.int64))
        self.prompt_length = len(prompt_ids(TextTokenizer(files.tokenizer), self.layout, lq_block))
        self.max_positions = self.config_dict["max_position_embeddings"]
        self.codec_file = files.vq

    @functools.cached_property
    def codec(self) -> tuple[int, int]:
        """(bytes of the VQ codec's weights as loaded, the most its encode or decode of one tile holds at once):
        the codec built from the VQ file's tensor shapes on the meta device and run there (``live_bytes.py``)."""
        from .live_bytes import LiveBytes
        from .vq import VQConfig, VQModel

        config = VQConfig.from_state_dict(vq_shapes(self.codec_file))
        with torch.device("meta"):
            vq = VQModel(config).eval()
            side = self.tile // config.downsample
            codes = torch.zeros((1, side, side), dtype=torch.int64)
        held = sum(t.numel() * t.element_size() for t in (*vq.parameters(), *vq.buffers()))
        with torch.no_grad(), LiveBytes() as decode:
            pixels = vq.decode(codes)
        with torch.no_grad(), LiveBytes() as encode:
            vq.encode(pixels)
        return held, max(decode.peak, encode.peak)


def vq_shapes(path) -> dict:
    """The VQ checkpoint's tensors as meta tensors of their shapes (a safetensors header, or a mapped .pt)."""
    if path.suffix == ".safetensors":
        return {name: torch.empty(entry.shape, device="meta") for name, entry in read_header(path).items()}
    return {name: torch.empty(t.shape, device="meta") for name, t in load_vq_state_dict(path, mmap=True).items()}


@functools.lru_cache(maxsize=8)
def _model_shape(root: str, config_mtime: float, dtype: torch.dtype, tile: int | None) -> ModelShape:
    return ModelShape(root, dtype, tile)


def model_shape(path, dtype: torch.dtype, tile: int | None = None) -> ModelShape:
    """``ModelShape``, built once per folder, config.json version, dtype and tile (the meta 7B takes seconds)."""
    files = CheckpointFiles.locate(path)
    return _model_shape(str(files.root.resolve()), files.config.stat().st_mtime, dtype, tile)


def weight_bytes(shape: ModelShape, quantization: str | None, text_rows_off_device: bool = False) -> int:
    """Bytes of the loaded model's parameters and buffers on the device, plus the decoder's own copies."""
    item = shape.dtype.itemsize
    if quantization in ("nf4", "int8"):
        # bitsandbytes converts every nn.Linear but the output embedding while loading; fuse_projections then
        # leaves those layers unjoined, so the unjoined model is the one stored
        lm, packed = shape.unjoined, {id(m.weight): m for name, m in shape.unjoined.named_modules()
                                      if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    else:
        lm, packed = shape.lm, ({id(m.weight): m for m in shape.lm.model.layers.modules() if _int4_fits(m)}
                                if quantization == "int4" else {})
    # placement.py leaves transformers' unused VQ-VAE on the host; bitsandbytes' load puts the whole model on the device
    host = set() if quantization in ("nf4", "int8") else {
        id(t) for name in HOST_ONLY for t in (*getattr(lm.model, name).parameters(), *getattr(lm.model, name).buffers())}
    total = 0
    for p in lm.parameters():
        n = p.numel()
        if id(p) in host:
            continue
        if id(p) not in packed:
            total += n * p.dtype.itemsize
        elif quantization == "int4":  # tinygemm: 4-bit pairs per byte, a bf16 scale and zero per group of inputs
            out_features, in_features = p.shape
            total += n // 2 + (in_features // INT4_GROUP) * out_features * 2 * 2
        elif quantization == "nf4":  # 4-bit pairs per byte, one float32 absmax per block
            total += -(-n // 2) + -(-n // BNB_BLOCK) * 4
        else:  # LLM.int8(): int8 weights, one float32 scale per output row
            total += n + p.shape[0] * 4
    total += sum(b.numel() * b.dtype.itemsize for b in lm.buffers() if id(b) not in host)
    heads, head_dim = kv_shape(shape.config)
    total += shape.layout.codebook_size * shape.config.hidden_size * item  # ImageHead: lm_head's image rows, copied
    # DecodeLayers: each layer's joined q/k norm gains and biases, and the rotary sign
    total += shape.config.num_hidden_layers * 2 * (shape.config.num_attention_heads + heads) * head_dim * item
    if text_rows_off_device:  # SplitVocabulary: the whole tables leave; the image phase's rows and an id table stay
        vocab = shape.config_dict["vocab_size"]
        total -= 2 * vocab * shape.config.hidden_size * item
        total += len(shape.layout.image_phase_ids) * shape.config.hidden_size * item + vocab * 8
    return total + head_dim * item


def kv_groups(shape: ModelShape, tile_batch: int, sampling: SamplingConfig | None = None) -> list[tuple[int, ...]]:
    """The (rows, capacity, prompt slots) of the two cache groups a batch of ``tile_batch`` tiles allocates
    (decoder.prefill), for ``sampling`` (None: the default sampling, what restore plans for)."""
    with warnings.catch_warnings():  # a tile past the trained context: the restoration warns, not its plan
        warnings.simplefilter("ignore", RuntimeWarning)
        sizes = cache_sizes(shape.prompt_length, shape.tile, sampling or SamplingConfig(), shape.max_positions)
    return [(tile_batch, max(sizes.capacity, shape.prompt_length), shape.prompt_length),
            (tile_batch, sizes.unconditional_capacity, 0)]


def workspace_bytes(shape: ModelShape, tile_batch: int, kv_cache: KVKind | None) -> int:
    """An estimate of the step's transient memory: the prefill (the widest call) and a quantized span's read."""
    config, item = shape.config, shape.dtype.itemsize
    hidden, inter = config.hidden_size, config.intermediate_size
    tokens = tile_batch * min(shape.prompt_length, PREFILL_CHUNK)  # the prefill's calls (decoder.prefill)
    (rows, capacity, _), _ = kv_groups(shape, tile_batch)
    # residual, normed input, q/k/v (3), attention output (1) in hidden; gate/up (2) and their product (1)
    activations = tokens * (6 * hidden + 3 * inter) * item
    mask = tokens * capacity * item  # the additive attention mask of the prefill
    heads, head_dim = kv_shape(config)
    # a quantized cache is read back one layer at a time in the model's dtype (keys and values, both groups)
    dequantized = 0 if kv_cache is None else 2 * 2 * rows * heads * capacity * head_dim * item
    return activations + mask + dequantized + RESERVE_BYTES


def loading_bytes(shape: ModelShape, quantization: str | None) -> int:
    """An upper bound on what loading holds beyond the finished weights (``placement.place``): one decoder layer
    in the model's dtype, its joined projections beside their parts, and under int4 a float32 copy of the widest
    weight for torchao's scales (bitsandbytes quantizes while transformers reads: counted the same way)."""
    layer = shape.unjoined.model.layers[0]
    item = shape.dtype.itemsize
    layer_bytes = sum(p.numel() for p in layer.parameters()) * item
    joined = sum(m.weight.numel() for m in shape.lm.model.layers[0].modules()
                 if isinstance(m, torch.nn.Linear) and m.out_features > shape.config.hidden_size) * item
    widest = max(m.weight.numel() for m in shape.lm.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    return layer_bytes + joined + (widest * 4 if quantization else 0)


def peak(shape: ModelShape, setting: Setting, tile_batch: int) -> Peak:
    heads, head_dim = kv_shape(shape.config)
    kv = kv_bytes(shape.config.num_hidden_layers, heads, head_dim, kv_groups(shape, tile_batch), shape.dtype,
                  setting.kv_cache)
    codec, codec_work = (0, 0) if setting.codec_on_host else shape.codec
    return Peak(setting, tile_batch, shape.dtype, weight_bytes(shape, setting.quantization, setting.text_rows_off_device), kv,
                workspace_bytes(shape, tile_batch, setting.kv_cache), loading_bytes(shape, setting.quantization),
                codec, codec_work + RESERVE_BYTES if codec_work else 0)


def candidates(on_cuda: bool, quantization: str | None = None, kv_cache: KVKind | None = None,
               quantization_given: bool = False, kv_cache_given: bool = False) -> list[Setting]:
    """Settings in the order the plan tries them (the module docstring says why); a given option is fixed."""
    if on_cuda:  # each setting tried with the whole vocabulary on the device, then with it on the CPU
        order = [Setting(None, None), Setting(None, None, True), Setting("int4", None), Setting("int4", None, True),
                 Setting("int4", "int8", True), Setting("int4", "int4", True)]
    else:  # torchao's int4 needs CUDA, and off CUDA the "off-device" copy would be on the same memory
        order = [Setting(None, None), Setting(None, "int8"), Setting(None, "int4")]
    if quantization_given:
        order = [s for s in order if s.quantization == quantization] or [Setting(quantization, None)]
        if quantization in ("nf4", "int8"):  # bitsandbytes' formats: any cache beside them
            order = [Setting(quantization, kv, text) for kv in (None, "int8", "int4") for text in (False, True)
                     if on_cuda or not text]
    if kv_cache_given:
        order = list(dict.fromkeys(Setting(s.quantization, kv_cache, s.text_rows_off_device) for s in order))
    if on_cuda:  # each, then with the VQ codec on the CPU: seconds per tile, against every step for the next
        order = [t for s in order for t in (s, replace(s, codec_on_host=True))]
    return order


def tile_batches(tile_batch: int) -> list[int]:
    """``tile_batch``, then halved down to 1."""
    out = [tile_batch]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def plan(path, *, budget: int, budget_source: str, device: str, dtype: torch.dtype | None = None,
         quantization: str | None = None, kv_cache: KVKind | None = None, quantization_given: bool = False,
         kv_cache_given: bool = False, tile_batch: int = 4) -> Plan:
    """The fastest configuration whose predicted peak fits ``budget`` bytes, or MemoryBudgetError naming the
    smallest budget that would hold one. Reads config.json and tokenizer.json only."""
    on_cuda = str(device).startswith("cuda")
    settings = candidates(on_cuda, quantization, kv_cache, quantization_given, kv_cache_given)
    tried: list[Peak] = []
    for setting in settings:
        load_dtype = _load_dtype(setting, device, dtype)
        shape = model_shape(path, load_dtype)
        for batch in tile_batches(tile_batch):
            candidate = peak(shape, setting, batch)
            if candidate.total <= budget:
                return Plan(candidate, budget, budget_source, tuple(tried))
            tried.append(candidate)
    smallest = min(tried, key=lambda p: p.total)
    asked = "" if not (quantization_given or kv_cache_given) else " with the options given"
    raise MemoryBudgetError(
        f"nothing fits in {gb(budget)} ({budget_source}){asked}: the smallest configuration, {smallest.describe()}, "
        f"needs {gb(smallest.total)}; give --max-memory {math.ceil(smallest.total / 1e7) / 100:.2f}GB or more")


def _load_dtype(setting: Setting, device: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype load_components loads in (int4: bfloat16; else the given one, fp16 on CUDA, float32 elsewhere)."""
    if setting.quantization == "int4":
        return torch.bfloat16
    if dtype is not None:
        return dtype
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def device_budget(device: str) -> int:
    """Free memory of a CUDA device now (what the default plan fits into)."""
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch sees no CUDA device, so there is no memory to plan for")
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def share_budget(share: float, device: str = "cuda") -> int:
    """A worker's budget on a GPU it shares (restore-many's gpus-per-worker below 1): its share of the card,
    or the memory free now if that is less."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(min(free, total * share))


def plan_load(path, *, device: str, dtype: torch.dtype | None, quantization: str | None, kv_cache: KVKind | None,
              max_memory: str | int | None, tile_batch: int = 4) -> Plan:
    """``Restorer.from_pretrained``'s plan: the budget is ``max_memory``, else (CUDA) the device's free memory;
    an explicit ``quantization``/``kv_cache`` is kept and checked against it."""
    if quantization == "int4":
        check_int4(device, dtype)  # its device, dtype and torchao first, as load_components checks them
    if max_memory is not None:
        budget, source = parse_bytes(max_memory), "max_memory"
    else:
        budget, source = device_budget(device), "free CUDA memory"
    return plan(path, budget=budget, budget_source=source, device=device, dtype=dtype, quantization=quantization,
                kv_cache=kv_cache, quantization_given=quantization is not None, kv_cache_given=kv_cache is not None,
                tile_batch=tile_batch)
