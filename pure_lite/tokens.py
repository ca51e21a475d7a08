"""PURE's token layout (docs/pure-format.md §2-3), the only module that knows token names.

Every special id is looked up by name in the tokenizer's vocabulary; the image
id<->code tables are rebuilt from the ``IMGIMG`` token names.  An image block is

    <racm3:break> <grid H/32> <grid W/32> (w codes, <row end>) x h <eoss>

with h = H/8 and w = W/8 latent codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import CheckpointError, TokenFormatError
from .model_files import MAX_TOKENIZER_BYTES, read_json

BOS = "<s>"
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
ROW_END = "<reserved08799>"
END_OF_TURN = "<reserved08706>"
IMAGE_TOKEN_PREFIX = "IMGIMG"
GRID_PIXELS = 32  # one grid token counts 32 pixels
LATENT_STRIDE = 8  # the VQ-8 tokenizer: one code per 8x8 pixels
CODES_PER_GRID = GRID_PIXELS // LATENT_STRIDE
MAX_TOKEN_ID = 1 << 22  # vocabularies larger than 4M ids are refused (PURE's has 73728)
MAX_GRID = 64  # grid tokens looked up: up to 64 x 32 = 2048 pixels per side


def grid_token_name(n: int) -> str:
    """Name of the token that says "n grids of 32 pixels"."""
    return f"<reserved{8800 + n:05d}>"


def image_token_name(code: int) -> str:
    """Name of the image token for a VQ code: digits spelled A..J, then one trailing letter."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_from_image_token_name(name: str) -> int:
    """Inverse of the naming rule: drop the prefix and the last character, letters A..J are digits."""
    body = name[len(IMAGE_TOKEN_PREFIX):-1]
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in body)
    return int(digits)


def image_block_length(height_px: int, width_px: int) -> int:
    """Number of tokens in the block of an H x W image (3 + h*(w+1) + 1)."""
    h, w = height_px // LATENT_STRIDE, width_px // LATENT_STRIDE
    return 3 + h * (w + 1) + 1


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Special ids and image tables of one vocabulary.

    ``image_ids[code]`` is the token id of VQ code ``code``; ``code_of[id]`` is the code
    of a token id, or -1 for non-image tokens.
    """

    vocab_size: int
    bos: int
    image_start: int
    image_end: int
    row_end: int
    end_of_turn: int
    grid_ids: Mapping[int, int]
    image_ids: np.ndarray
    code_of: np.ndarray = field(repr=False)

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], vocab_size: int | None = None) -> "TokenLayout":
        """Build the layout from a name->id mapping; ``vocab_size`` (from the model config) may exceed it."""
        size = max(vocab.values()) + 1 if vocab_size is None else int(vocab_size)

        def need(name: str) -> int:
            if name not in vocab:
                raise CheckpointError(f"tokenizer has no token {name!r}, which PURE's format needs")
            return int(vocab[name])

        pairs = []
        for name, tid in vocab.items():
            if name.startswith(IMAGE_TOKEN_PREFIX):
                try:
                    pairs.append((code_from_image_token_name(name), int(tid)))
                except ValueError as exc:
                    raise CheckpointError(f"image token name {name!r} does not spell a code") from exc
        if not pairs:
            raise CheckpointError("tokenizer has no IMGIMG image tokens")
        pairs.sort()
        codes = np.array([c for c, _ in pairs])
        if not np.array_equal(codes, np.arange(len(pairs))):
            raise CheckpointError("image token codes are not exactly 0..N-1 (duplicate or missing IMGIMG names)")
        image_ids = np.array([t for _, t in pairs], dtype=np.int64)
        if image_ids.max() >= size:
            raise CheckpointError(f"image token id {int(image_ids.max())} is outside the vocabulary of {size}")
        code_of = np.full(size, -1, dtype=np.int64)
        code_of[image_ids] = np.arange(len(image_ids))
        grid_ids = {n: int(vocab[grid_token_name(n)]) for n in range(1, MAX_GRID + 1) if grid_token_name(n) in vocab}
        image_ids.setflags(write=False)
        code_of.setflags(write=False)
        return cls(
            vocab_size=size,
            bos=need(BOS),
            image_start=need(IMAGE_START),
            image_end=need(IMAGE_END),
            row_end=need(ROW_END),
            end_of_turn=need(END_OF_TURN),
            grid_ids=grid_ids,
            image_ids=image_ids,
            code_of=code_of,
        )

    @classmethod
    def from_tokenizer_file(cls, path: str | Path, vocab_size: int | None = None) -> "TokenLayout":
        """Read the vocabulary (model vocab plus added tokens) from a Hugging Face ``tokenizer.json``."""
        return cls.from_vocab(read_tokenizer_vocab(path), vocab_size)

    @property
    def codebook_size(self) -> int:
        return len(self.image_ids)

    @cached_property
    def image_runs(self) -> tuple[tuple[int, int], ...]:
        """The image ids in code order as contiguous (start, stop) id ranges (two for the release).

        Slicing these runs gathers the image logits far faster than fancy indexing.
        """
        breaks = np.flatnonzero(np.diff(self.image_ids) != 1) + 1
        bounds = zip(np.r_[0, breaks], np.r_[breaks, len(self.image_ids)])
        return tuple((int(self.image_ids[a]), int(self.image_ids[b - 1]) + 1) for a, b in bounds)

    def image_logits(self, logits: np.ndarray) -> np.ndarray:
        """(..., V) logits -> (..., codebook) logits of the image tokens, in code order."""
        runs = self.image_runs
        if len(runs) > 8:
            return logits[..., self.image_ids]
        return np.concatenate([logits[..., a:b] for a, b in runs], axis=-1)

    @property
    def image_phase_ids(self) -> np.ndarray:
        """Every id decoding an image block feeds after the prompt, sorted: the header's image start and grid
        sizes, the codes' ids, the row ends (the end of image is never fed)."""
        return np.unique(np.concatenate([self.image_ids, [self.image_start, self.row_end],
                                         np.fromiter(self.grid_ids.values(), np.int64)]))

    def grid_id(self, n: int) -> int:
        if n not in self.grid_ids:
            raise TokenFormatError(f"the vocabulary has no grid token for {n} x 32 pixels ({grid_token_name(n)})")
        return self.grid_ids[n]

    def grid_size(self, token_id: int) -> int | None:
        """Number of grids a grid token states, or None if it is not one."""
        for n, tid in self.grid_ids.items():
            if tid == token_id:
                return n
        return None

    def encode_image(self, codes: np.ndarray) -> np.ndarray:
        """Image block (1-D int64) for an h x w array of VQ codes; h and w multiples of 4."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] % CODES_PER_GRID or codes.shape[1] % CODES_PER_GRID:
            raise TokenFormatError(f"codes must be 2-D with sides that are multiples of {CODES_PER_GRID}, got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise TokenFormatError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        h, w = codes.shape
        body = np.empty((h, w + 1), dtype=np.int64)
        body[:, :w] = self.image_ids[codes]
        body[:, w] = self.row_end
        head = [self.image_start, self.grid_id(h // CODES_PER_GRID), self.grid_id(w // CODES_PER_GRID)]
        return np.concatenate([np.array(head, dtype=np.int64), body.reshape(-1), np.array([self.image_end])])

    def header(self, height_px: int, width_px: int) -> np.ndarray:
        """The three tokens that open the block of an H x W image."""
        for side in (height_px, width_px):
            if side <= 0 or side % GRID_PIXELS:
                raise TokenFormatError(f"image sides must be positive multiples of {GRID_PIXELS} pixels, got {side}")
        return np.array(
            [self.image_start, self.grid_id(height_px // GRID_PIXELS), self.grid_id(width_px // GRID_PIXELS)],
            dtype=np.int64,
        )

    def parse_image(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Strictly parse one complete image block into an h x w code array.

        Raises TokenFormatError naming the first offending position: a missing start,
        unknown grid tokens, a non-image token inside a row, a row end in the wrong place,
        a missing end, trailing tokens, or a truncated block.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if n == 0 or ids[0] != self.image_start:
            raise TokenFormatError("image block must start with <racm3:break>", 0)
        if n < 3:
            raise TokenFormatError("image block truncated inside its size tokens", n)
        gh, gw = self.grid_size(int(ids[1])), self.grid_size(int(ids[2]))
        if gh is None:
            raise TokenFormatError(f"expected a grid (height) token, found id {int(ids[1])}", 1)
        if gw is None:
            raise TokenFormatError(f"expected a grid (width) token, found id {int(ids[2])}", 2)
        h, w = gh * CODES_PER_GRID, gw * CODES_PER_GRID
        codes = np.empty((h, w), dtype=np.int64)
        pos = 3
        for r in range(h):
            for c in range(w + 1):
                if pos >= n:
                    raise TokenFormatError(f"image block truncated in row {r} of {h}", pos)
                tid = int(ids[pos])
                if c < w:
                    code = int(self.code_of[tid]) if 0 <= tid < self.vocab_size else -1
                    if code < 0:
                        what = "row end" if tid == self.row_end else "end of image" if tid == self.image_end else f"id {tid}"
                        raise TokenFormatError(
                            f"row {r} has {c} codes where the grid tokens say {w}; found {what} instead of an image token",
                            pos,
                        )
                    codes[r, c] = code
                elif tid != self.row_end:
                    raise TokenFormatError(f"row {r} should end after {w} codes, found id {tid}", pos)
                pos += 1
        if pos >= n:
            raise TokenFormatError("image block truncated before <eoss>", pos)
        if ids[pos] != self.image_end:
            raise TokenFormatError(f"expected <eoss> after {h} rows, found id {int(ids[pos])}", pos)
        if pos + 1 != n:
            raise TokenFormatError(f"{n - pos - 1} tokens after <eoss>", pos + 1)
        return codes

    def find_image_block(self, ids: Sequence[int] | np.ndarray) -> tuple[int, int] | None:
        """(start, stop) of the first image block in a token stream, or None when it has no image start."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        starts = np.flatnonzero(ids == self.image_start)
        if not len(starts):
            return None
        start = int(starts[0])
        ends = np.flatnonzero(ids[start:] == self.image_end)
        stop = start + int(ends[0]) + 1 if len(ends) else len(ids)
        return start, stop


def read_tokenizer_vocab(path: str | Path) -> dict[str, int]:
    """name -> id of a Hugging Face ``tokenizer.json``: the model's vocabulary plus its added tokens.

    Bounded in size (pure_lite.model_files) and checked in shape: every id an integer in
    0..MAX_TOKEN_ID, every added token an object with a string ``content`` and an integer ``id``.
    """
    path = Path(path)
    data = read_json(path, MAX_TOKENIZER_BYTES)
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{path}: no vocabulary: 'model.vocab' must be an object of token name -> id")
    added = data.get("added_tokens", [])
    if not isinstance(added, list):
        raise CheckpointError(f"{path}: 'added_tokens' must be a list")
    pairs = list(vocab.items())
    for i, token in enumerate(added):
        if not isinstance(token, dict) or not isinstance(token.get("content"), str) or "id" not in token:
            raise CheckpointError(f"{path}: added_tokens[{i}] must be an object with a string 'content' and an 'id'")
        pairs.append((token["content"], token["id"]))
    for name, tid in pairs:
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < MAX_TOKEN_ID:
            raise CheckpointError(f"{path}: token {name[:40]!r} has id {repr(tid)[:40]}, not an integer in "
                                  f"0..{MAX_TOKEN_ID - 1}")
    return dict(pairs)
