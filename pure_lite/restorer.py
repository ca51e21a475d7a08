"""The public pipeline: ``Restorer.from_pretrained(...).restore(image)`` -> ``Restoration``.

Steps of one restoration:
 1. read the input; plan the model's square tiles over the output (``scale`` x the input,
    any aspect ratio; tiles.py), or one square of ``target_size`` (PURE's own mode)
 2. per tile: resize its region of the input to the tile (bicubic), VQ-encode it, build the prompt
 3. decode the tiles in batches of ``tile_batch``: text, then the HQ image block (generate.py)
 4. VQ-decode each tile, apply the wavelet colour fix against its resized input, blend the tiles
"""

from __future__ import annotations

import math
import time
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

    image: Image.Image  # RGB, scale x the input (or target_size x target_size)
    text: str  # the raw generated text
    degradation: str | None  # the degradation statement, when the text has one
    description: str | None  # the content description, when present
    tokens: np.ndarray  # generated ids: text, HQ image block, end of turn
    prompt_tokens: np.ndarray  # the prompt ids (instruction and LQ image block)
    entropy: np.ndarray  # the sampler's entropy (nats) per 8x8 output pixels: low where smooth, high in texture
    timings: dict[str, float]  # seconds per stage, image steps per second, decoder calls
    tiles: tuple[Tile, ...] = ()


class Restorer:
    """A loaded PURE model. Stateless between calls: each ``restore`` starts from a fresh KV cache."""

    def __init__(self, components: Components):
        self.components = components

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
    ) -> "Restorer":
        """Load a PURE checkpoint folder (docs/pure-format.md §1) or a pure-lite export (None: the shipped PURE-tiny).

        ``backend="auto"`` serves a folder with ``pure_lite_manifest.json`` through the
        torch-free runtime (ONNX Runtime; ``providers`` overrides the CUDA-else-CPU choice)
        and anything else through torch (``device``, ``dtype``; ``quantization`` loads the
        language model's decoder layers 4-bit nf4 or 8-bit through bitsandbytes, or int4 through
        torchao, CUDA and bfloat16 only: the fastest 4-bit decode measured, docs/gpu.md; ``kv_cache="int8"``
        halves the KV cache's memory, the rest of a 512² restoration's peak at 4-bit; ``"int4"`` takes it to
        a bit over a quarter, for a card int8 does not fit, docs/gpu.md).
        """
        from .manifest import MANIFEST_FILE

        if path is None:
            if not (DEFAULT_MODEL / MANIFEST_FILE).is_file():
                raise CheckpointError(f"this installation has no default model at {DEFAULT_MODEL}; pass a model path")
            path = DEFAULT_MODEL
        if backend == "auto":
            backend = "onnx" if (Path(path) / MANIFEST_FILE).is_file() else "torch"
        if backend == "onnx":
            if quantization is not None or kv_cache is not None:
                raise ValueError("quantization and kv_cache apply to the torch backend; exports are quantized "
                                 "at export time")
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

        return cls(load_components(path, device=device, dtype=dtype, quantization=quantization, kv_cache=kv_cache))

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
        progress: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> Restoration:
        """Restore ``image`` to ``scale`` times its width and height, any aspect ratio.

        The output is covered by overlapping tiles of the model's own size, decoded
        ``tile_batch`` at a time; tile i samples with seed ``seed + i`` (None: fresh entropy),
        so a tile's result does not depend on the batch it was in. ``target_size`` instead
        restores one target_size x target_size square of the whole input (PURE's own mode).
        ``progress`` shows a bar over tiles; ``cancel`` is polled during decoding and True
        stops it with GenerationCancelled.
        """
        c = self.components
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
        width, height = images.image_size(image)
        if target_size is not None:
            if target_size <= 0 or target_size % GRID_PIXELS:
                raise ValueError(f"target_size must be a positive multiple of {GRID_PIXELS}, got {target_size}")
            plan = TilePlan(output=(target_size, target_size), canvas=(target_size, target_size), tile=target_size,
                            boxes=((0, 0, target_size, target_size),))
            decode_at = (target_size, target_size)
        else:
            if not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"scale must be a positive number, got {scale}")
            out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
            if out_w * out_h > MAX_OUTPUT_PIXELS:
                raise InvalidImageError(
                    f"a {width}x{height} input at scale {scale:g} would be {out_w}x{out_h} pixels, more than the "
                    f"{MAX_OUTPUT_PIXELS // 2**20} Mpx pixel limit; use a smaller scale or crop the photo"
                )
            plan = TilePlan.cover(out_w, out_h, c.image_size)
            decode_at = None
        c.layout.header(plan.tile, plan.tile)  # fails early if the vocabulary lacks this grid size

        timings: dict[str, float] = {"tiles": len(plan.boxes)}
        t0 = time.perf_counter()
        rgb = images.load_image(image, reduce_to=decode_at)
        lq_tiles = [input_region(rgb, plan, box) for box in plan.boxes]
        del rgb
        prompts = [tile_prompt(c, lq) for lq in lq_tiles]
        timings["encode_s"] = time.perf_counter() - t0

        canvas = Canvas(plan, LATENT_STRIDE)
        seeds = np.random.SeedSequence().spawn(len(plan.boxes)) if seed is None else [seed + i for i in range(len(plan.boxes))]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.boxes), desc=f"restoring {len(plan.boxes)} tile(s)", unit="tile",
                       bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]")
        tiles, tile_calls = [], 0
        try:
            for first in range(0, len(plan.boxes), tile_batch):
                batch = range(first, min(first + tile_batch, len(plan.boxes)))
                done_before = first
                gens = generate_batch(
                    c.new_decoder(), [prompts[i] for i in batch], c.layout, plan.tile, sampling,
                    [np.random.default_rng(seeds[i]) for i in batch], max_positions=c.max_positions,
                    on_step=(lambda done, total: _advance_bar(bar, done_before + len(batch) * done / total))
                    if bar is not None else None,
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
        finally:
            if bar is not None:
                bar.close()
        codes = len(plan.boxes) * (plan.tile // LATENT_STRIDE) ** 2
        timings["image_steps_per_s"] = codes / max(timings["image_s"], 1e-9)
        timings["accepted_per_call"] = codes / max(tile_calls, 1)  # codes a tile commits per decoder call
        pixels, entropy = canvas.result()
        first_tile = tiles[0]
        return Restoration(
            image=images.to_pil(pixels),
            text=first_tile.text,
            degradation=first_tile.degradation,
            description=first_tile.description,
            tokens=first_tile.tokens,
            prompt_tokens=first_tile.prompt_tokens,
            entropy=entropy,
            timings=timings,
            tiles=tuple(tiles),
        )


def tile_prompt(components: Components, tile: np.ndarray) -> np.ndarray:
    """The prompt ids for one LQ tile (H x W x 3 float RGB in [0, 1], already at the tile's output size):
    the tile through the VQ encoder, inside PURE's instruction."""
    c = components
    return prompt_ids(c.tokenizer, c.layout, c.layout.encode_image(c.codec.encode(images.to_model_input(tile))))


def _advance_bar(bar, position: float) -> None:
    bar.update(position - bar.n)
