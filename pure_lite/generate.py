"""The decode loop: prompt -> text -> one image block, shared by every backend.

A backend only has to provide a ``Decoder`` (prefill, one unconditional branch, steps
that feed the same tokens to every live branch, with logits over the whole vocabulary or
over the image tokens only). Forced tokens cost nothing extra: the
image header is fed in one call, and each row end rides along with the row's last code,
so an h x w image takes h*w decoder calls, not h*(w+1)+3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .errors import GenerationCancelled, GenerationError
from .sampling import NumpySampler, Sampler, SamplingConfig
from .tokens import CODES_PER_GRID, GRID_PIXELS, TokenLayout, image_block_length


class Decoder(Protocol):
    """One restoration's model state (KV caches) behind a NumPy interface."""

    def prefill(self, ids: np.ndarray, capacity: int) -> np.ndarray:
        """Start the conditional branch with the prompt; returns (1, V) logits of its last position.

        ``capacity`` is the most positions this restoration will hold, for backends that
        allocate their cache once.
        """
        ...

    def begin_unconditional(self) -> None:
        """Open the unconditional (CFG) branch: an empty context with positions starting at 0."""
        ...

    def step(self, ids: np.ndarray, image: bool = False) -> np.ndarray:
        """Append the same tokens to every live branch; returns logits of the last position.

        ``image=False``: (branches, V) over the whole vocabulary. ``image=True``: (branches,
        codebook) over the image tokens only, in code order — exact inside an image, where
        every other id is masked, and the head does a quarter of the work.
        """
        ...


@dataclass
class Generation:
    tokens: np.ndarray  # generated ids: text, image block, end of turn
    text_tokens: np.ndarray  # the text part only
    codes: np.ndarray  # h x w VQ codes
    entropy: np.ndarray  # h x w entropy (nats) measured when each code was drawn
    timings: dict[str, float] = field(default_factory=dict)


def generate(
    decoder: Decoder,
    prompt: np.ndarray,
    layout: TokenLayout,
    size_px: int,
    config: SamplingConfig,
    rng: np.random.Generator,
    *,
    max_positions: int,
    sampler: Sampler | None = None,
    on_step: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Generation:
    """Generate PURE's answer: free text, then a size_px x size_px image block (grid forced).

    ``on_step(done, total)`` is called after each image row (for progress bars);
    ``cancel()`` is polled at the same points and a True answer raises GenerationCancelled.
    Raises GenerationError when the budget cannot hold the image, before any decoding:
    a started image is always finished, so a malformed block never reaches the VQ decoder.
    """
    sampler = sampler or NumpySampler()
    h = w = size_px // GRID_PIXELS * CODES_PER_GRID
    block_len = image_block_length(size_px, size_px)
    room = min(config.max_new_tokens, max_positions - len(prompt)) - block_len - 1
    if room < 0:
        raise GenerationError(
            f"a {size_px}x{size_px} image block needs {block_len + 1} new tokens after a prompt of {len(prompt)}, "
            f"but the limit is {min(config.max_new_tokens, max_positions - len(prompt))} "
            f"(max_new_tokens={config.max_new_tokens}, model max positions={max_positions})"
        )
    text_budget = min(config.max_text_tokens, room)
    header = layout.header(size_px, size_px)
    # Text may not contain image tokens (the stock model masks them too) nor end the turn before the image.
    banned = np.concatenate([layout.image_ids, [layout.end_of_turn, layout.image_end, layout.row_end]])
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    logits = decoder.prefill(prompt, capacity=len(prompt) + text_budget + block_len)
    timings["prefill_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text: list[int] = []
    while len(text) < text_budget:
        if cancel is not None and len(text) % 16 == 0 and cancel():
            raise GenerationCancelled("cancelled while writing text")
        token = sampler.text_token(logits[0], banned, config, rng)
        if token == layout.image_start:
            break
        text.append(token)
        logits = decoder.step(np.array([token], dtype=np.int64))
    timings["text_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = config.uses_cfg
    if cfg:
        decoder.begin_unconditional()
    logits = decoder.step(header, image=True)
    image_ids = layout.image_ids
    codes = np.empty((h, w), dtype=np.int64)
    entropy = np.empty((h, w), dtype=np.float32)
    for r in range(h):
        for c in range(w):
            cond, uncond = logits[0], (logits[1] if cfg else None)
            code, ent = sampler.image_code(cond, uncond, config, rng)
            codes[r, c], entropy[r, c] = code, ent
            if c < w - 1:
                logits = decoder.step(image_ids[code : code + 1], image=True)
            elif r < h - 1:
                logits = decoder.step(np.array([image_ids[code], layout.row_end], dtype=np.int64), image=True)
        if on_step is not None:
            on_step(r + 1, h)
        if cancel is not None and r < h - 1 and cancel():
            raise GenerationCancelled(f"cancelled after {r + 1} of {h} image rows")
    timings["image_s"] = time.perf_counter() - t0
    timings["image_steps_per_s"] = h * w / max(timings["image_s"], 1e-9)

    text_tokens = np.array(text, dtype=np.int64)
    tokens = np.concatenate([text_tokens, layout.encode_image(codes), [layout.end_of_turn]]).astype(np.int64)
    return Generation(tokens=tokens, text_tokens=text_tokens, codes=codes, entropy=entropy, timings=timings)
