"""What a backend hands the pipeline: the pieces of one loaded model, behind NumPy interfaces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .generate import Decoder
from .prompt import TextTokenizer
from .tokens import TokenLayout


class ImageCodec(Protocol):
    """The VQ image tokenizer: pixels (1, 3, H, W) in [-1, 1] <-> codes (H/8, W/8)."""

    def encode(self, pixels: np.ndarray) -> np.ndarray: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...


PURE_IMAGE_SIZE = 512  # the released PURE's output side; models that say nothing else are taken to have it
# The released PURE's factor: its prompt's LQ image is the input resized to the model's square, so a 128² input
# is x4 for the release (docs/pure-format.md §3); the prompt itself does not record the factor.
# pure-lite's training pairs default to x4 too (prepare-data --scale, PURE-tiny's packs); a checkpoint trained at
# another factor can say so in config.json (checkpoint.SCALE_KEY), and an export in its manifest (model.scale).
PURE_SCALE = 4


@dataclass(frozen=True)
class Components:
    layout: TokenLayout
    tokenizer: TextTokenizer
    codec: ImageCodec
    new_decoder: Callable[[], Decoder]  # a decoder for the next batch (its prefill starts afresh; may be the same one)
    max_positions: int
    description: str
    image_size: int = PURE_IMAGE_SIZE  # the output side the model was trained for: the tile side, the largest target_size
    trained_scale: int = PURE_SCALE  # the LQ -> HQ factor of its training pairs: a smaller restore scale warns
    # True when new_decoder hands every call the same decoder (the torch backend keeps its buffers and CUDA
    # graphs): the Restorer then runs one restore() at a time. False: a fresh decoder per call, calls overlap.
    shares_decoder: bool = False
