"""The public pipeline: ``Restorer.from_pretrained(...).restore(image)`` -> ``Restoration``.

Steps of one restoration:
 1. read the input; plan the model's square tiles over the output (``scale`` x the input,
    any aspect ratio; tiles.py), or one square of ``target_size`` (PURE's own mode)
 2. per tile: resize its region of the input to the tile (bicubic), VQ-encode it, build the prompt
 3. decode the tiles in batches of ``tile_batch``: text, then the HQ image block (generate.py)
 4. VQ-decode each tile, apply the wavelet colour fix against its resized input, blend the tiles
"""

from __future__ import annotations

import functools
import math
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image

from . import images
from .components import Components
from .errors import CheckpointError, InvalidImageError, MissingDependencyError
from .generate import generate_batch
from .prompt import parse_response, prompt_ids
from .sampling import SamplingConfig
from .tiles import DEFAULT_TILE_BATCH, MAX_OUTPUT_PIXELS, Canvas, TilePlan, input_region
from .tokens import GRID_PIXELS, LATENT_STRIDE

# PURE-tiny (docs/pure-tiny.md): trained by examples/train_pure_tiny.py, shipped as an int8 export so
# that the package restores something real with no download. It is a demonstration, not PURE's quality.
DEFAULT_MODEL = Path(__file__).parent / "models" / "pure_tiny"
DEFAULT_MODEL_NOTICE = ("using PURE-tiny, a small demonstration model shipped with pure-lite (128x128 output); "
                        "pass --model for a real PURE checkpoint or export")


@dataclass(frozen=True)
class Tile:
    """One restored tile: where it lies in the output, and what the model wrote for it."""

    box: tuple[int, int, int, int]  # (left, top, right, bottom) in output pixels
    text: str
    degradation: str | None
    description: str | None
    tokens: np.ndarray  # generated ids: text, HQ image block, end of turn
    prompt_tokens: np.ndarray  # instruction and LQ image block


@dataclass(frozen=True)
class Restoration:
    """The result of one restoration. Text fields and tokens are the first (top-left) tile's; ``tiles`` has all."""

    image: Image.Image  # scale x the input (or target_size x target_size); RGB, or what the input had (images.to_pil)
    text: str  # the raw generated text
    degradation: str | None  # the degradation statement, when the text has one
    description: str | None  # the content description, when present
    tokens: np.ndarray  # generated ids: text, HQ image block, end of turn
    prompt_tokens: np.ndarray  # the prompt ids (instruction and LQ image block)
    entropy: np.ndarray  # the sampler's entropy (nats) per 8x8 output pixels: low where smooth, high in texture
    timings: dict[str, float]  # seconds per stage, image steps per second, decoder calls
    tiles: tuple[Tile, ...] = ()


def _one_at_a_time_if_shared(restore):
    """Serialize ``restore`` per Restorer when its backend shares one decoder between calls."""

    @functools.wraps(restore)
    def serialized(self, *args, **kwargs):
        if not self.components.shares_decoder:
            return restore(self, *args, **kwargs)
        with self._lock:
            return restore(self, *args, **kwargs)

    return serialized


class Restorer:
    """A loaded PURE model. Each ``restore`` starts from a fresh KV cache; the only state kept between calls
    is which warnings were already given.

    Safe to share between threads. The ONNX runtime gives each call a decoder of its own (ONNX Runtime's
    sessions may be run from several threads), so calls overlap. The torch backend keeps one decoder (its
    cache buffers and CUDA graphs carry over from call to call), so its calls run one at a time, in turn:
    threads wait for each other instead of corrupting each other's cache. For parallel torch restorations,
    load one Restorer per thread (or per GPU).
    """

    def __init__(self, components: Components):
        self.components = components
        self._lock = threading.Lock()
        # scales below the model's factor already warned of: once per Restorer, not per image (Python's own
        # once-per-location registry is reset whenever any code changes the warning filters)
        self._warned_scales: set[float] = set()
        self.memory_plan = None  # the memory plan the torch backend loaded by (torch_backend/memory.py), if any

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        backend: Literal["auto", "torch", "onnx"] = "auto",
        device: str = "cpu",
        dtype=None,
        quantization: Literal["nf4", "int8", "int4"] | None = None,
        kv_cache: Literal["int8", "int4"] | None = None,
        providers: Sequence[str] | None = None,
        revision: str | None = None,
        max_memory: str | int | None = None,
    ) -> "Restorer":
        """Load a PURE checkpoint folder (docs/pure-format.md §1) or a pure-lite export (None: the shipped PURE-tiny).

        ``path`` may instead be a Hugging Face Hub id, ``"org/name"`` or ``"org/name@revision"`` (or
        ``revision=``), when no such path exists: fetched into Hugging Face's cache (pure_lite.hub).

        ``backend="auto"`` serves a folder with ``pure_lite_manifest.json`` through the
        torch-free runtime (ONNX Runtime; ``providers`` overrides the CUDA-else-CPU choice)
        and anything else through torch (``device``, ``dtype``; ``quantization`` loads the
        language model's decoder layers 4-bit nf4 or 8-bit through bitsandbytes, or int4 through
        torchao, CUDA and bfloat16 only: the fastest 4-bit decode measured, docs/gpu.md; ``kv_cache="int8"``
        halves the KV cache's memory, the rest of a 512² restoration's peak at 4-bit; ``"int4"`` takes it to
        41% (the prompt at int8, the rest at 4 bits), for a card int8 does not fit, docs/gpu.md).
        ``max_memory`` ("8GB", "7.5GiB", bytes; by default on CUDA the device's free memory) plans the load
        before any weight is read (``torch_backend/memory.py``): the fastest weights, cache, tile batch and
        placement (the vocabulary and the VQ codec on the GPU or the CPU) whose predicted peak fits, the load
        included, or a MemoryBudgetError naming the smallest budget that would; ``Restorer.memory_plan`` says
        what was chosen.
        """
        from .manifest import MANIFEST_FILE

        if path is None:
            if revision is not None:
                raise ValueError(f"revision={revision!r} applies to a Hugging Face Hub id; no model was named")
            if not (DEFAULT_MODEL / MANIFEST_FILE).is_file():
                raise CheckpointError(f"this installation has no default model at {DEFAULT_MODEL}; pass a model path")
            path = DEFAULT_MODEL
        else:
            from .hub import resolve_model

            path = resolve_model(path, revision)
        if backend == "auto":
            backend = "onnx" if (Path(path) / MANIFEST_FILE).is_file() else "torch"
        if backend == "onnx":
            if quantization is not None or kv_cache is not None or max_memory is not None:
                raise ValueError("quantization, kv_cache and max_memory apply to the torch backend; exports are "
                                 "quantized at export time")
            from .runtime import load_components as load_runtime

            return cls(load_runtime(path, providers=providers))
        if backend != "torch":
            raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'torch' or 'onnx'")
        from .checkpoint import CheckpointFiles

        CheckpointFiles.locate(path)  # a missing or incomplete folder is reported before torch is needed
        try:
            from .torch_backend.load import load_components
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                f"{path} is a PURE checkpoint folder, served by the torch backend, which needs {exc.name}: "
                "pip install torch==2.13.0 'pure-lite[torch]' (or serve an export of it with 'pure-lite[runtime]')"
            ) from exc

        plan = None
        if max_memory is not None or str(device).startswith("cuda"):
            from .torch_backend.memory import plan_load

            plan = plan_load(path, device=device, dtype=dtype, quantization=quantization, kv_cache=kv_cache,
                             max_memory=max_memory, tile_batch=DEFAULT_TILE_BATCH)
            quantization, kv_cache = plan.chosen.setting.quantization, plan.chosen.setting.kv_cache
        setting = plan.chosen.setting if plan is not None else None
        text_device = "cpu" if setting is not None and setting.text_rows_off_device else None
        codec_device = "cpu" if setting is not None and setting.codec_on_host else None
        restorer = cls(load_components(path, device=device, dtype=dtype, quantization=quantization, kv_cache=kv_cache,
                                       text_device=text_device, codec_device=codec_device))
        restorer.memory_plan = plan
        return restorer

    def plan(self, image: images.ImageInput, *, scale: float = 4, target_size: int | None = None) -> TilePlan:
        """Where the tiles of ``restore(image, scale=..., target_size=...)`` will lie, from the image's
        size alone (nothing is decoded): its output size and number of tiles, what the work will cost.

        ``target_size`` above the model's own side is refused: the model would write an image block
        longer than any it was trained on (positions past its training, memory growing with the
        square of the side) instead of tiling; ``scale`` covers any output with tiles of its side.
        """
        c = self.components
        check_restore_options(scale=scale, target_size=target_size)
        width, height = images.image_size(image)
        if target_size is not None:
            if target_size > c.image_size:
                raise ValueError(f"target_size {target_size} is above the {c.image_size}x{c.image_size} squares this "
                                 "model was trained to restore; use scale, which covers any output with tiles of "
                                 "that size")
            return TilePlan(output=(target_size, target_size), canvas=(target_size, target_size), tile=target_size,
                            boxes=((0, 0, target_size, target_size),))
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        if out_w * out_h > MAX_OUTPUT_PIXELS:
            raise InvalidImageError(
                f"a {width}x{height} input at scale {scale:g} would be {out_w}x{out_h} pixels, more than the "
                f"{MAX_OUTPUT_PIXELS // 2**20} Mpx pixel limit; use a smaller scale or crop the photo"
            )
        return TilePlan.cover(out_w, out_h, c.image_size)

    @_one_at_a_time_if_shared
    def restore(
        self,
        image: images.ImageInput,
        *,
        seed: int | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        scale: float = 4,
        target_size: int | None = None,
        tile_batch: int = DEFAULT_TILE_BATCH,
        color_fix: bool = True,
        progress: bool | Callable[[float, int], None] = False,
        cancel: Callable[[], bool] | None = None,
    ) -> Restoration:
        """Restore ``image`` to ``scale`` times its width and height, any aspect ratio.

        The output is covered by overlapping tiles of the model's own size, decoded
        ``tile_batch`` at a time; tile i samples with seed ``seed + i`` (None: fresh entropy),
        so a tile's result does not depend on the batch it was in. ``target_size`` instead
        restores one target_size x target_size square of the whole input (PURE's own mode), up
        to the model's own side (``plan``). A ``scale`` below the factor the model was trained
        for (``Components.trained_scale``: 4 for PURE and PURE-tiny) warns, once per Restorer: each
        tile's input is then enlarged less than in the model's training, and it comes back smeared.
        The model restores colour; the output keeps what the input had besides (alpha, grey, 16-bit
        grey, the colour profile; images.to_pil), and a file is read upright as its EXIF orientation says.

        ``progress(tiles_done, tiles_total)`` is called with (0, total) once the tiles are planned
        and encoded, before decoding; then as the image codes are decoded, ``tiles_done`` a fraction
        (the tiles of a batch advance together), so a caller can estimate the time left before the
        first tile is finished; and with the whole count after every batch (``progress=True``:
        ``console.TileProgress`` on stderr). ``cancel`` is polled during decoding and True stops it
        with GenerationCancelled.
        """
        c = self.components
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}; "
                            "for a dict d, pass SamplingConfig(**d)")
        check_restore_options(scale=scale, target_size=target_size, tile_batch=tile_batch)
        if self.memory_plan is not None:  # the memory plan's batch fits; a tile's result does not depend on its batch
            tile_batch = min(tile_batch, self.memory_plan.chosen.tile_batch)
        plan = self.plan(image, scale=scale, target_size=target_size)
        decode_at = plan.output if target_size is not None else None
        if target_size is None and scale < c.trained_scale and scale not in self._warned_scales:
            self._warned_scales.add(scale)
            warnings.warn(below_trained_scale(scale, c.trained_scale), UserWarning, stacklevel=2)
        c.layout.header(plan.tile, plan.tile)  # fails early if the vocabulary lacks this grid size

        timings: dict[str, float] = {"tiles": len(plan.boxes)}
        t0 = time.perf_counter()
        rgb, traits = images.load_photo(image, reduce_to=decode_at)
        lq_tiles = [input_region(rgb, plan, box) for box in plan.boxes]
        del rgb
        prompts = [tile_prompt(c, lq) for lq in lq_tiles]
        timings["encode_s"] = time.perf_counter() - t0

        canvas = Canvas(plan, LATENT_STRIDE)
        seeds = np.random.SeedSequence().spawn(len(plan.boxes)) if seed is None else [seed + i for i in range(len(plan.boxes))]
        reporter = None
        if progress is True:
            from .console import TileProgress

            progress = reporter = TileProgress(f"restoring {len(plan.boxes)} tile(s)")
        if progress:
            progress(0, len(plan.boxes))
        tiles, tile_calls = [], 0

        try:
            for first in range(0, len(plan.boxes), tile_batch):
                batch = range(first, min(first + tile_batch, len(plan.boxes)))
                gens = generate_batch(
                    c.new_decoder(), [prompts[i] for i in batch], c.layout, plan.tile, sampling,
                    [np.random.default_rng(seeds[i]) for i in batch], max_positions=c.max_positions,
                    on_step=_tile_fractions(progress, first, len(batch), len(plan.boxes)) if progress else None,
                    cancel=cancel,
                )
                t0 = time.perf_counter()
                for i, gen in zip(batch, gens):
                    out = images.from_model_output(c.codec.decode(gen.codes))
                    if color_fix:
                        out = images.color_fix(out, lq_tiles[i])
                    canvas.add(plan.boxes[i], out, gen.entropy)
                    text = c.tokenizer.decode(gen.text_tokens)
                    parsed = parse_response(text)
                    tiles.append(Tile(box=plan.output_box(plan.boxes[i]), text=text, degradation=parsed.degradation,
                                      description=parsed.description, tokens=gen.tokens, prompt_tokens=prompts[i]))
                timings["decode_image_s"] = timings.get("decode_image_s", 0.0) + time.perf_counter() - t0
                for key in ("prefill_s", "text_s", "image_s"):
                    timings[key] = timings.get(key, 0.0) + gens[0].timings[key]
                timings["decoder_calls"] = timings.get("decoder_calls", 0) + gens[0].timings["batch_calls"]
                tile_calls += sum(gen.timings["decoder_calls"] for gen in gens)
                if progress:
                    progress(batch.stop, len(plan.boxes))
        finally:
            if reporter is not None:
                reporter.close()
        codes = len(plan.boxes) * (plan.tile // LATENT_STRIDE) ** 2
        timings["image_steps_per_s"] = codes / max(timings["image_s"], 1e-9)
        timings["accepted_per_call"] = codes / max(tile_calls, 1)  # codes a tile commits per decoder call
        pixels, entropy = canvas.result()
        first_tile = tiles[0]
        return Restoration(
            image=images.to_pil(pixels, traits),
            text=first_tile.text,
            degradation=first_tile.degradation,
            description=first_tile.description,
            tokens=first_tile.tokens,
            prompt_tokens=first_tile.prompt_tokens,
            entropy=entropy,
            timings=timings,
            tiles=tuple(tiles),
        )


def _tile_fractions(progress: Callable[[float, int], None], first: int, batch: int, tiles: int):
    """The decode loop's ``on_step(codes done, codes)`` over a batch as ``progress`` in tiles: the batch's
    tiles advance together from ``first``."""
    return lambda done, total: progress(first + batch * done / total, tiles)


def check_restore_options(*, scale: float = 4, target_size: int | None = None,
                          tile_batch: int = DEFAULT_TILE_BATCH) -> None:
    """Refuse ``restore`` options no image can be restored with (ValueError), before any work (restore-many
    checks them before its journal records them)."""
    if not isinstance(tile_batch, (int, np.integer)) or tile_batch < 1:
        raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
    if target_size is not None:
        if not isinstance(target_size, (int, np.integer)) or target_size <= 0 or target_size % GRID_PIXELS:
            raise ValueError(f"target_size must be a positive multiple of {GRID_PIXELS}, got {target_size}")
    elif not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive number, got {scale}")


def tile_prompt(components: Components, tile: np.ndarray) -> np.ndarray:
    """The prompt ids for one LQ tile (H x W x 3 float RGB in [0, 1], already at the tile's output size):
    the tile through the VQ encoder, inside PURE's instruction."""
    c = components
    return prompt_ids(c.tokenizer, c.layout, c.layout.encode_image(c.codec.encode(images.to_model_input(tile))))


def below_trained_scale(scale: float, trained_scale: int) -> str:
    """The warning for a ``scale`` below the model's own factor (shared by restore and the command line)."""
    return (f"scale {scale:g} is below the x{trained_scale} this model was trained for: each tile's input is "
            f"enlarged less than the model expects, and it comes back smeared, often worse than the photo "
            f"given; restore at x{trained_scale} and downscale the result for a smaller output")
