"""The public pipeline: ``Restorer.from_pretrained(...).restore(image)`` -> ``Restoration``.

Steps of one restoration:
 1. load and convert the input, resize it to the model's square size (bicubic)
 2. VQ-encode it and build the prompt around its image block
 3. decode: text, then the HQ image block (generate.py)
 4. VQ-decode the codes, apply the wavelet colour fix against the resized input
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image

from . import images
from .components import Components
from .errors import CheckpointError, MissingDependencyError
from .generate import generate
from .prompt import parse_response, prompt_ids
from .sampling import SamplingConfig
from .tokens import GRID_PIXELS

# PURE-tiny (docs/pure-tiny.md): trained by examples/train_pure_tiny.py, shipped as an int8 export so
# that the package restores something real with no download. It is a demonstration, not PURE's quality.
DEFAULT_MODEL = Path(__file__).parent / "models" / "pure_tiny"
DEFAULT_MODEL_NOTICE = ("using PURE-tiny, a small demonstration model shipped with pure-lite (128x128 output); "
                        "pass --model for a real PURE checkpoint or export")


@dataclass(frozen=True)
class Restoration:
    """The result of one restoration."""

    image: Image.Image  # RGB, target_size x target_size
    text: str  # the raw generated text
    degradation: str | None  # the degradation statement, when the text has one
    description: str | None  # the content description, when present
    tokens: np.ndarray  # generated ids: text, HQ image block, end of turn
    prompt_tokens: np.ndarray  # the prompt ids (instruction and LQ image block)
    entropy: np.ndarray  # h x w entropy (nats) the sampler measured at each image position
    timings: dict[str, float]  # seconds per stage, and image steps per second


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
        quantization: Literal["nf4", "int8"] | None = None,
        providers: Sequence[str] | None = None,
    ) -> "Restorer":
        """Load a PURE checkpoint folder (docs/pure-format.md §1) or a pure-lite export (None: the shipped PURE-tiny).

        ``backend="auto"`` serves a folder with ``pure_lite_manifest.json`` through the
        torch-free runtime (ONNX Runtime; ``providers`` overrides the CUDA-else-CPU choice)
        and anything else through torch (``device``, ``dtype``; ``quantization`` loads the
        language model 4-bit nf4 or 8-bit through bitsandbytes).
        """
        from .manifest import MANIFEST_FILE

        if path is None:
            if not (DEFAULT_MODEL / MANIFEST_FILE).is_file():
                raise CheckpointError(f"this installation has no default model at {DEFAULT_MODEL}; pass a model path")
            path = DEFAULT_MODEL
        if backend == "auto":
            backend = "onnx" if (Path(path) / MANIFEST_FILE).is_file() else "torch"
        if backend == "onnx":
            if quantization is not None:
                raise ValueError("quantization applies to the torch backend; exports are quantized at export time")
            from .runtime import load_components as load_runtime

            return cls(load_runtime(path, providers=providers))
        if backend != "torch":
            raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'torch' or 'onnx'")
        from .checkpoint import CheckpointFiles

        CheckpointFiles.locate(path)  # a missing or incomplete folder is reported before torch is needed
        try:
            from .torch_backend import load_components
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                f"{path} is a PURE checkpoint folder, served by the torch backend, which needs {exc.name}: "
                "pip install torch==2.13.0 'pure-lite[torch]' (or serve an export of it with 'pure-lite[runtime]')"
            ) from exc

        return cls(load_components(path, device=device, dtype=dtype, quantization=quantization))

    def restore(
        self,
        image: images.ImageInput,
        *,
        seed: int | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        target_size: int | None = None,
        color_fix: bool = True,
        progress: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> Restoration:
        """Restore one image to ``target_size`` x ``target_size`` pixels (default: the model's own size).

        ``seed`` makes sampling reproducible (None draws fresh entropy). ``progress``
        shows a bar over image rows. ``cancel`` is polled during decoding; returning True
        stops it with GenerationCancelled.
        """
        c = self.components
        target_size = c.image_size if target_size is None else target_size
        if target_size <= 0 or target_size % GRID_PIXELS:
            raise ValueError(f"target_size must be a positive multiple of {GRID_PIXELS}, got {target_size}")
        c.layout.header(target_size, target_size)  # fails early if the vocabulary lacks this grid size
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        rgb = images.load_image(image)
        lq = images.resize(rgb, target_size)
        lq_codes = c.codec.encode(images.to_model_input(lq))
        prompt = prompt_ids(c.tokenizer, c.layout, c.layout.encode_image(lq_codes))
        timings["encode_s"] = time.perf_counter() - t0

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target_size // 8, desc="decoding rows", unit="row")
        try:
            gen = generate(
                c.new_decoder(), prompt, c.layout, target_size, sampling, np.random.default_rng(seed),
                max_positions=c.max_positions,
                on_step=(lambda done, total: bar.update(1)) if bar is not None else None, cancel=cancel,
            )
        finally:
            if bar is not None:
                bar.close()
        timings.update(gen.timings)

        t0 = time.perf_counter()
        out = images.from_model_output(c.codec.decode(gen.codes))
        if color_fix:
            out = images.color_fix(out, lq)
        timings["decode_image_s"] = time.perf_counter() - t0
        text = c.tokenizer.decode(gen.text_tokens)
        parsed = parse_response(text)
        return Restoration(
            image=images.to_pil(out),
            text=text,
            degradation=parsed.degradation,
            description=parsed.description,
            tokens=gen.tokens,
            prompt_tokens=prompt,
            entropy=gen.entropy,
            timings=timings,
        )

