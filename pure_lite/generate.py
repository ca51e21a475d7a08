"""The decode loop: prompts -> text -> one image block each, shared by every backend.

A batch of B restorations (the tiles of a photo, or several photos) decodes together:
one decoder call per step serves all their rows, so the weights are read once per step.
Restoration i's conditional branch is row i and, once its image starts, its
unconditional (CFG) branch is row B + i.

Every row keeps its own length: its tokens sit in cache slots 0..length-1, and a token's
slot is also its position. A call feeds the same number T of tokens to every live row; a
row with fewer real tokens (a restoration that finished its text early, or a shorter
Jacobi window) is padded, and the padding is taken back with ``Decoder.rewind`` — the
same pointer move that drops rejected speculative drafts. Nothing is copied.

The image is decoded by one loop for plain and speculative Jacobi decoding (SJD,
``SamplingConfig.jacobi_window``). Each call feeds a restoration's *lead* (tokens already
chosen but not yet in the cache: the image header, or the last code with its row end)
followed by up to ``jacobi_window`` draft codes, with the forced row ends in place. The
output before each draft gives the distribution p the draft is checked against (accept
with probability min(1, p/q), q being what the draft was drawn from); at the first
rejection a code is drawn from max(p - q, 0), otherwise one more code from the output
after the last draft. So every call commits at least one code, and with a window of 0
this is exactly plain decoding. Unchecked outputs (after a rejection) become the next
drafts; the rest of the window is refilled uniformly at random from the image tokens.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from .errors import GenerationCancelled, GenerationError
from .sampling import NumpySampler, Sampler, SamplingConfig, draw, image_distributions
from .tokens import LATENT_STRIDE, TokenLayout, image_block_length


class Decoder(Protocol):
    """The model state (KV caches) of a batch of restorations behind a NumPy interface."""

    def prefill(self, prompts: Sequence[np.ndarray], capacity: int, max_step: int,
                unconditional_capacity: int | None = None) -> np.ndarray:
        """Open one conditional row per prompt; returns (B, V) logits at each prompt's last token.

        ``capacity``: the most slots any row will hold; ``max_step``: the most tokens a later
        call feeds; ``unconditional_capacity``: the most an unconditional row will hold (the
        image block). Backends allocate their cache once from these.
        """
        ...

    def begin_unconditional(self) -> None:
        """Open rows B..2B-1 (the CFG branches): empty, positions from 0."""
        ...

    def step(self, ids: np.ndarray, image: bool = False, all_positions: bool = False) -> np.ndarray:
        """Append ``ids`` (rows, T) to the live rows, each at its own length.

        Returns the logits of the last new position, (rows, V), or with ``all_positions``
        of every new position, (rows, T, V). ``image=True``: over the image tokens only, in
        code order (exact inside an image, where every other id is masked) — V is the codebook.
        """
        ...

    def rewind(self, counts: np.ndarray) -> None:
        """Forget the last ``counts[r]`` tokens of each live row r; their slots are reused."""
        ...

    # Optional: ``decode_plain_image(header, side, config, seeds, image_ids, row_end, progress)`` ->
    # (codes (B, side²), entropies (B, side²), calls). A backend that can chain plain decoding on
    # its device (draw, feed, next step, with no host round trip: pure_lite.torch_backend.decoder) offers
    # it, and the loop hands it the whole image phase when no speculation is asked for.


@dataclass
class Generation:
    tokens: np.ndarray  # generated ids: text, image block, end of turn
    text_tokens: np.ndarray  # the text part only
    codes: np.ndarray  # h x w VQ codes
    entropy: np.ndarray  # h x w entropy (nats) of the distribution each code was drawn from
    timings: dict[str, float] = field(default_factory=dict)


def decode_budget(prompt_length: int, size_px: int, config: SamplingConfig, max_positions: int) -> int:
    """Text tokens allowed before the image; refuses a budget that cannot hold the image block.

    The text is cut short so that the whole answer stays within ``max_positions`` when it
    can. That is the context the model was trained at, not a limit of its rotary positions
    (the reference generates past it too), so an image that does not fit even without
    text still runs, with a warning.
    """
    block_len = image_block_length(size_px, size_px)
    if config.max_new_tokens < block_len + 1:
        raise GenerationError(
            f"a {size_px}x{size_px} image block needs {block_len + 1} new tokens, "
            f"but max_new_tokens is {config.max_new_tokens}"
        )
    room = max_positions - prompt_length - block_len - 1
    if room < 0:
        warnings.warn(
            f"a {size_px}x{size_px} restoration needs {prompt_length + block_len + 1} positions, beyond the "
            f"{max_positions} the model was trained at; it runs, but quality may suffer", RuntimeWarning, stacklevel=4,
        )
    return max(0, min(config.max_text_tokens, config.max_new_tokens - block_len - 1, room))


@dataclass(frozen=True)
class CacheSizes:
    """What ``generate_batch`` asks ``Decoder.prefill`` to allocate per row (the memory plan sizes the KV cache
    from the same numbers)."""

    capacity: int  # slots of a conditional row: prompt, text, image block, one widest call
    unconditional_capacity: int  # slots of an unconditional (CFG) row: the image block and one widest call
    max_step: int  # the most tokens one later call feeds
    text_budget: int  # text tokens allowed before the image (``decode_budget``)


def cache_sizes(prompt_length: int, size_px: int, config: SamplingConfig, max_positions: int) -> CacheSizes:
    """The cache a batch whose longest prompt has ``prompt_length`` tokens needs for a size_px² image."""
    text_budget = decode_budget(prompt_length, size_px, config, max_positions)
    window = config.jacobi_window
    # header (3) + drafts + the row ends among them (+1 for a lead code that ends its row)
    max_step = 3 + window + window // (size_px // LATENT_STRIDE) + 1
    block = image_block_length(size_px, size_px)
    return CacheSizes(capacity=prompt_length + text_budget + block + max_step,
                      unconditional_capacity=block + max_step, max_step=max_step, text_budget=text_budget)


def generate(decoder: Decoder, prompt: np.ndarray, layout: TokenLayout, size_px: int, config: SamplingConfig,
             rng: np.random.Generator, **kwargs) -> Generation:
    """One restoration: ``generate_batch`` with a batch of one."""
    return generate_batch(decoder, [prompt], layout, size_px, config, [rng], **kwargs)[0]


def generate_batch(
    decoder: Decoder,
    prompts: Sequence[np.ndarray],
    layout: TokenLayout,
    size_px: int,
    config: SamplingConfig,
    rngs: Sequence[np.random.Generator],
    *,
    max_positions: int,
    sampler: Sampler | None = None,
    on_step: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[Generation]:
    """Generate PURE's answer for each prompt: free text, then a size_px x size_px image block.

    Restoration i draws only from ``rngs[i]``, so its result does not depend on the batch it
    is in. ``on_step(done, total)`` reports image codes committed over the batch after every
    call; ``cancel()`` is polled as often and a True answer raises GenerationCancelled.
    Budget errors are raised before any decoding: a started image is always finished, so a
    malformed block never reaches the VQ decoder.
    """
    if len(prompts) != len(rngs) or not prompts:
        raise ValueError("generate_batch needs one random generator per prompt, and at least one prompt")
    sampler = sampler or NumpySampler()
    side = size_px // LATENT_STRIDE
    sizes = cache_sizes(max(len(p) for p in prompts), size_px, config, max_positions)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    logits = decoder.prefill([np.asarray(p, dtype=np.int64) for p in prompts], sizes.capacity, sizes.max_step,
                             unconditional_capacity=sizes.unconditional_capacity)
    timings["prefill_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = _write_text(decoder, logits, layout, config, rngs, sampler, sizes.text_budget, cancel)
    timings["text_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = [_ImageDecode(side, layout, config, rng) for rng in rngs]
    calls = _decode_images(decoder, images, layout, size_px, config, sampler, on_step, cancel)
    timings["image_s"] = time.perf_counter() - t0
    timings["image_steps_per_s"] = len(images) * side * side / max(timings["image_s"], 1e-9)
    timings["batch_calls"] = calls  # image-phase decoder calls of the whole batch

    out = []
    for text, image in zip(texts, images):
        text_tokens = np.array(text, dtype=np.int64)
        codes = image.codes.reshape(side, side)
        tokens = np.concatenate([text_tokens, layout.encode_image(codes), [layout.end_of_turn]]).astype(np.int64)
        # this restoration's calls (those it had tokens in) and codes committed per call
        own = dict(timings, decoder_calls=image.calls, accepted_per_call=side * side / max(image.calls, 1))
        out.append(Generation(tokens=tokens, text_tokens=text_tokens, codes=codes,
                              entropy=image.entropy.reshape(side, side), timings=own))
    return out


def _write_text(decoder, logits, layout, config, rngs, sampler, budget, cancel) -> list[list[int]]:
    """The text before each image: one call per token for the rows still writing."""
    batch = len(rngs)
    # Text may not contain image tokens (the stock model masks them too) nor end the turn before the image.
    banned = np.concatenate([layout.image_ids, [layout.end_of_turn, layout.image_end, layout.row_end]])
    texts: list[list[int]] = [[] for _ in range(batch)]
    writing = np.full(batch, budget > 0)
    steps = 0
    while writing.any():
        if cancel is not None and steps % 16 == 0 and cancel():
            raise GenerationCancelled("cancelled while writing text")
        ids = np.full(batch, layout.image_start, dtype=np.int64)  # padding for rows not writing: rewound
        fed = np.zeros(batch, bool)
        for i in np.flatnonzero(writing):
            token = sampler.text_token(logits[i], banned, config, rngs[i])
            if token == layout.image_start:
                writing[i] = False
                continue
            texts[i].append(token)
            ids[i], fed[i] = token, True
            writing[i] = len(texts[i]) < budget
        if not fed.any():
            break
        logits = decoder.step(ids[:, None])
        decoder.rewind((~fed).astype(np.int64))
        steps += 1
    return texts


class _ImageDecode:
    """One restoration's image in progress: committed codes, the lead still to feed, the drafts."""

    def __init__(self, side: int, layout: TokenLayout, config: SamplingConfig, rng: np.random.Generator):
        self.side, self.layout, self.config, self.rng = side, layout, config, rng
        self.total, self.codebook = side * side, layout.codebook_size
        self.codes = np.zeros(self.total, np.int64)
        self.entropy = np.zeros(self.total, np.float32)
        self.done = 0  # codes committed
        self.lead: list[int] = []  # committed tokens whose keys are not in the cache yet
        self.drafts: list[tuple[int, np.ndarray | None]] = []  # (code, q); q None: uniform
        self.calls = 0

    @property
    def finished(self) -> bool:
        return self.done == self.total

    def ends_row(self, index: int) -> bool:
        """A row end follows code ``index`` (none after the last code: ``<eoss>`` is never fed)."""
        return index % self.side == self.side - 1 and index < self.total - 1

    def start(self, header: list[int]) -> None:
        self.lead = list(header)
        self._redraft(np.zeros((0, self.codebook)))

    def commit(self, code: int, entropy: float) -> None:
        self.codes[self.done], self.entropy[self.done] = code, entropy
        self.lead = [int(self.layout.image_ids[code])] + ([self.layout.row_end] if self.ends_row(self.done) else [])
        self.done += 1

    def inputs(self) -> tuple[list[int], list[int]]:
        """This call's tokens (lead, then drafts with their row ends) and each draft's position."""
        tokens, where = list(self.lead), []
        for j, (code, _) in enumerate(self.drafts[: self.total - self.done]):
            where.append(len(tokens))
            tokens.append(int(self.layout.image_ids[code]))
            if self.ends_row(self.done + j):
                tokens.append(self.layout.row_end)
        return tokens, where

    def outputs(self, fed: tuple[list[int], list[int]]) -> list[int]:
        """The positions of this call's outputs that this restoration reads: the one before each
        draft (the distribution the draft is checked against), then the last (the next code)."""
        tokens, where = fed
        return [i - 1 for i in where] + [len(tokens) - 1]

    def take(self, code: int, entropy: float, fed: tuple[list[int], list[int]]) -> int:
        """Plain decoding: commit the code drawn from the last output. Returns the tokens to keep (all)."""
        self.calls += 1
        self.commit(code, entropy)
        return len(fed[0])

    def advance(self, probs: np.ndarray, ents: np.ndarray, fed: tuple[list[int], list[int]]) -> int:
        """Check the drafts against the distributions at ``outputs(fed)`` (``image_distributions`` of
        this call's outputs there); ``fed`` is what ``inputs()`` gave for this call. Returns the
        tokens to keep."""
        tokens, where = fed
        self.calls += 1
        rng = self.rng
        for j, (code, q) in enumerate(self.drafts[: len(where)]):
            p = probs[j]
            ratio = p[code] * self.codebook if q is None else p[code] / q[code]
            if rng.random() < ratio:
                self.commit(code, ents[j])
                continue
            residual = np.maximum(p - (1.0 / self.codebook if q is None else q), 0.0)
            self.commit(draw(residual if residual.sum() > 0 else p, rng), ents[j])
            # The outputs after the rejected draft could not be checked (their prefix held it): next drafts.
            self._redraft(probs[j + 1:])
            return where[j]
        if not self.finished:
            self.commit(draw(probs[-1], rng), ents[-1])
        self._redraft(probs[:0])
        return len(tokens)

    def _redraft(self, probs: np.ndarray) -> None:
        """Next drafts: one from each given distribution, then uniform draws from the image tokens, up to the window."""
        room = min(self.config.jacobi_window, self.total - self.done)
        self.drafts = [(draw(p, self.rng), p) for p in probs[:room]]
        if len(self.drafts) < room:
            self.drafts += [(int(c), None) for c in self.rng.integers(0, self.codebook, room - len(self.drafts))]


def _decode_chained(chained, images: list[_ImageDecode], header, layout, config, on_step, cancel) -> int:
    """The image phase on a backend that chains plain decoding on its device (see ``Decoder``).

    Each restoration's seed for the device draws comes from its own generator, so its codes do
    not depend on the batch it is in.
    """
    side, total = images[0].side, images[0].total

    def progress(done: int) -> None:
        if on_step is not None:
            on_step(done * len(images), total * len(images))
        if cancel is not None and cancel():
            raise GenerationCancelled(f"cancelled after {done * len(images)} of {total * len(images)} image codes")

    seeds = [int(image.rng.integers(0, 2**63)) for image in images]
    codes, entropy, calls = chained(header, side, config, seeds, layout.image_ids, layout.row_end, progress)
    for image, row_codes, row_entropy in zip(images, codes, entropy):
        image.codes[:], image.entropy[:] = row_codes, row_entropy
        image.done, image.calls = total, calls
    return calls


def _decode_images(decoder, images: list[_ImageDecode], layout, size_px, config, sampler, on_step, cancel) -> int:
    """Decode every restoration's image block; returns the number of decoder calls."""
    batch, cfg = len(images), config.uses_cfg
    if cfg:
        decoder.begin_unconditional()
    header = [int(t) for t in layout.header(size_px, size_px)]
    chained = getattr(decoder, "decode_plain_image", None)
    if chained is not None and config.jacobi_window == 0:
        return _decode_chained(chained, images, header, layout, config, on_step, cancel)
    for image in images:
        image.start(header)
    calls = 0
    total = batch * images[0].total
    while not all(image.finished for image in images):
        if cancel is not None and cancel():
            done = sum(image.done for image in images)
            raise GenerationCancelled(f"cancelled after {done} of {total} image codes")
        fed = [image.inputs() if not image.finished else ([], []) for image in images]
        inputs = [tokens for tokens, _ in fed]
        width = max(len(t) for t in inputs)
        ids = np.full((batch, width), layout.image_start, dtype=np.int64)  # padding: rewound below
        for i, tokens in enumerate(inputs):
            ids[i, : len(tokens)] = tokens
        logits = decoder.step(np.concatenate([ids, ids]) if cfg else ids, image=True, all_positions=True)
        calls += 1
        # The outputs each restoration reads, gathered for all of them: SJD's distributions are one call.
        live = [i for i in range(batch) if inputs[i]]
        reads = [images[i].outputs(fed[i]) for i in live]
        row = np.repeat(live, [len(r) for r in reads])
        position = np.concatenate(reads)
        cond, uncond = logits[row, position], (logits[batch + row, position] if cfg else None)
        keep = np.zeros(batch, np.int64)
        if config.jacobi_window:
            probs, ents = image_distributions(cond, uncond, config)
            ends = np.cumsum([len(r) for r in reads])
            for i, end, n in zip(live, ends, map(len, reads)):
                keep[i] = images[i].advance(probs[end - n:end], ents[end - n:end], fed[i])
        else:
            for j, i in enumerate(live):
                code, entropy = sampler.image_code(cond[j], None if uncond is None else uncond[j], config, images[i].rng)
                keep[i] = images[i].take(code, entropy, fed[i])
        drop = width - keep
        decoder.rewind(np.concatenate([drop, drop]) if cfg else drop)
        if on_step is not None:
            on_step(sum(image.done for image in images), total)
    return calls
