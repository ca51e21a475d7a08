"""PURE's conversation format (docs/pure-format.md §3, §7): prompt ids for inference, ids and labels for training.

    prompt    = <s> INSTRUCTION [LQ image block] <end of turn>
    assistant = RESPONSE TEXT [HQ image block] <end of turn>

Text goes through the checkpoint's own ``tokenizers`` JSON; special tokens come from
the TokenLayout, never from text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .model_files import MAX_TOKENIZER_BYTES, read_bytes
from .tokens import TokenLayout

INSTRUCTION = (
    "Perceive the degradation level, understand the image content, and restore the high-quality image. "
)
IGNORE_INDEX = -100


class TextTokenizer:
    """The checkpoint's text tokenizer (Hugging Face ``tokenizers`` JSON), without special-token magic."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        text = read_bytes(Path(path), MAX_TOKENIZER_BYTES)  # bounded, a regular file (pure_lite.model_files)
        try:
            self._tok = Tokenizer.from_str(text.decode("utf-8"))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"cannot load the text tokenizer {path}: {exc}") from exc

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def prompt_ids(tokenizer: TextTokenizer, layout: TokenLayout, lq_block: np.ndarray,
               instruction: str = INSTRUCTION) -> np.ndarray:
    """Token ids of the inference prompt around an LQ image block."""
    return np.concatenate(
        [[layout.bos], tokenizer.encode(instruction), lq_block, [layout.end_of_turn]]
    ).astype(np.int64)


def training_example(
    tokenizer: TextTokenizer, layout: TokenLayout, lq_block: np.ndarray, response: str, hq_block: np.ndarray,
    instruction: str = INSTRUCTION,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of one conversation; only the assistant's tokens are supervised."""
    prompt = prompt_ids(tokenizer, layout, lq_block, instruction)
    answer = np.concatenate([tokenizer.encode(response), hq_block, [layout.end_of_turn]]).astype(np.int64)
    ids = np.concatenate([prompt, answer])
    labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), answer])
    return ids, labels


# The degradation sentence PURE-style models are trained to write (pure_lite.train.data), one level
# (small / medium / large) per degradation type; parse_degradation_levels reads it back.
DEGRADATION_TEMPLATE = "The image has {noise} noise, {blur} blur and {jpeg} JPEG artifacts."
_LEVEL_PATTERN = re.compile(r"\b(small|medium|large)\s+(noise|blur|jpeg)\b", re.IGNORECASE)


def degradation_sentence(levels: dict[str, str]) -> str:
    return DEGRADATION_TEMPLATE.format(**levels)


def parse_degradation_levels(text: str | None) -> dict[str, str]:
    """{type: level} for every "<level> <type>" phrase found (types: noise, blur, jpeg)."""
    return {t.lower(): lvl.lower() for lvl, t in _LEVEL_PATTERN.findall(text or "")}


@dataclass(frozen=True)
class ParsedResponse:
    degradation: str | None
    description: str | None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_response(text: str) -> ParsedResponse:
    """Split PURE's text leniently: the first sentence is the degradation, the rest the description.

    The first sentence counts as a degradation statement only when it names one
    (noise, blur, JPEG/compression or a degradation level); otherwise the whole text is
    the description. Missing parts are None.
    """
    text = text.strip()
    if not text:
        return ParsedResponse(None, None)
    parts = _SENTENCE_END.split(text, maxsplit=1)
    first = parts[0].strip()
    rest = parts[1].strip() if len(parts) > 1 else ""
    if re.search(r"degrad|noise|blur|jpeg|compress", first, re.IGNORECASE):
        return ParsedResponse(first or None, rest or None)
    return ParsedResponse(None, text)
