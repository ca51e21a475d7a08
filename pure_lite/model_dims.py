"""Plausible bounds for a model's numbers, checked when a model is loaded, before anything is allocated.

A checkpoint's ``config.json`` and an export's manifest size every buffer pure-lite and transformers
allocate (layers, KV cache, logits, the id->code table). A number outside these bounds is a broken or
hostile model, reported as such (naming the file and field) instead of a hang, a huge allocation, or
an error blamed on the photo later. The bounds are generous: about 8x past the largest released
transformer in each dimension (PURE itself is 4096 wide, 32 layers, 32 heads, 73728 ids, 512 px).
"""

from __future__ import annotations

import math

from .errors import CheckpointError
from .tokens import GRID_PIXELS, MAX_GRID, MAX_TOKEN_ID

BOUNDS = {
    "vocab_size": (1, MAX_TOKEN_ID),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 19),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 2048),
    "max_position_embeddings": (1, 1 << 22),
    "codebook_size": (1, 1 << 20),
}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = GRID_PIXELS, MAX_GRID * GRID_PIXELS  # the sides the vocabulary can state
MAX_SCALE = MAX_IMAGE_SIZE // GRID_PIXELS  # an LQ tile of at least one code


def check_int(where: str, key: str, value, error: type[CheckpointError] = CheckpointError) -> int:
    """``value`` if it is an integer within ``BOUNDS[key]``; otherwise ``error`` naming ``where`` and ``key``."""
    low, high = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where}: {key} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise error(f"{where}: {key} is {_show(value)}, outside the plausible range {low}..{high}")
    return value


def check_image_size(where: str, key: str, value, error: type[CheckpointError] = CheckpointError) -> int:
    """An output side: a multiple of 32 that the vocabulary's grid tokens can state (32..2048)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE \
            or value % GRID_PIXELS:
        raise error(f"{where}: {key} must be a multiple of {GRID_PIXELS} between {MIN_IMAGE_SIZE} and "
                    f"{MAX_IMAGE_SIZE}, got {_show(value)}")
    return value


def check_scale(where: str, key: str, value, error: type[CheckpointError] = CheckpointError) -> int:
    """A training pairs' LQ -> HQ factor: a whole number from 1 to MAX_SCALE."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SCALE:
        raise error(f"{where}: {key} must be an integer from 1 to {MAX_SCALE}, got {_show(value)}")
    return value


def check_heads(where: str, heads: int, kv_heads: int, error: type[CheckpointError] = CheckpointError) -> None:
    """Grouped-query attention needs the query heads to be a multiple of the key/value heads."""
    if kv_heads > heads or heads % kv_heads:
        raise error(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")


def _show(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
