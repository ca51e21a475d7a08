"""The torch backend's Decoder: the KV cache of ``kv_cache.py``, eager on CPU, CUDA graphs on a GPU.

Three choices, each for the GPU (docs/gpu.md has the numbers):

- **Captured steps.** The cache's static shapes (``GroupedKV``: attention reads each group's first
  ``span`` slots, ``span`` rounded up to ``attend_bucket``) leave a decode step a few shapes only, and
  on CUDA each is captured once as a CUDA graph and replayed: one launch instead of ~1000 kernels
  launched from Python (the eager 7B step is launch-bound: 65 ms on an H200 against a ~4 ms
  bandwidth floor).
- **Plain image decoding chained on the device** (``decode_plain_image``): the draw
  (``sampler.py``, uniforms from a counter hash), the drawn code's token id and the next decoder
  step are one graph; the host only chooses which graph to replay (a code that ends an image row
  rides with the row end: two tokens) and reads the codes back once per image row, which keeps the
  progress bar and cancellation working.
- **Few kernels per step**: the layers run as ``layers.py`` writes them (transformers' own forward
  stays available as ``layers="transformers"``, the reference it is checked against), keys and values
  share one tensor per layer (one write per group), and the uniforms of a whole restoration are
  hashed once (a lookup per step).

Graph capture and the chained loop stay in this module with the decoder: both are ways of running
its step, and share its buffers. The same code runs eagerly on CPU (graphs are a CUDA feature); there
the shared decode loop samples on the host with the NumPy sampler unless ``device_loop=True`` is
asked for. Speculative decoding and the text before the image always go through the shared loop
(``pure_lite.generate``) and this class's ``step``/``rewind``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from ..errors import GenerationError
from ..sampling import SamplingConfig
from . import sampler
from .chameleon import ChameleonStep, TextHead, kv_shape
from .kv_cache import GroupedKV, KVKind, use_grouped_attention
from .layers import DecodeLayers
from .vocab_rows import SplitVocabulary

PREFILL_CHUNK = 1024  # prompt tokens per prefill call (the memory plan's workspace is sized by it)


class TorchDecoder:
    """The torch backend's Decoder (see pure_lite.generate), on CPU or CUDA.

    ``graphs``: capture each step shape as a CUDA graph (default: on CUDA). ``device_loop``:
    offer ``decode_plain_image`` to the decode loop (default: on CUDA). ``attend_bucket``: the
    slots attention reads are rounded up to a multiple of this (default 1 when eager, exact;
    512 with graphs, so a 512² restoration needs ~30 captured shapes). ``kv_cache``: ``"int8"`` keeps the KV
    cache in int8 with a scale per slot and head (half the cache memory), ``"int4"`` rotated, the prompt in int8
    and the rest in packed int4 with a scale and an offset per 16 values of a key and per 64 of a value, each
    row's newest 136 slots also exact (41% of the memory for a 512² tile; see ``kv_cache._Group``).
    ``layers``: ``"fused"``
    runs the layers as ``layers.py`` writes them (about half the kernels per step); ``"triton"``
    the same with its elementwise work in ``fused_kernels.py`` (about half again), and an int8 cache
    read by its attention kernel (CUDA; not yet the default: docs/gpu.md; no int4 cache: its kernels neither
    pack nor unpack 4-bit values); ``"transformers"`` runs
    transformers' own layer forward over the same cache (the reference it is tested and benchmarked against).
    ``text_device`` (with ``image_phase_ids``, the ids an image block feeds): keep only those rows of the input
    embedding on ``device`` and move the whole embedding and ``lm_head`` to ``text_device``, which then embeds
    and scores the prefill and the text (``vocab_rows.py``; the memory plan's "vocabulary off the device").
    """

    def __init__(self, lm, image_head, device: str = "cpu", *, graphs: bool | None = None,
                 device_loop: bool | None = None, attend_bucket: int | None = None, kv_cache: KVKind | None = None,
                 layers: Literal["fused", "triton", "transformers"] = "fused", text_device: str | None = None,
                 image_phase_ids: np.ndarray | None = None):
        if kv_cache not in (None, "int8", "int4"):
            raise ValueError(f"kv_cache must be 'int8', 'int4' or None (the model's dtype), got {kv_cache!r}")
        if layers == "triton" and kv_cache == "int4":
            raise ValueError("layers='triton' cannot store or read an int4 KV cache; use layers='fused' with it")
        self.vocab = None
        if text_device is not None:
            if image_phase_ids is None:
                raise ValueError("text_device needs image_phase_ids: the embedding rows kept on the device")
            self.vocab = SplitVocabulary(lm, image_phase_ids, device, text_device)
        if layers in ("fused", "triton"):
            self.layers_fn = DecodeLayers(lm, kernels="triton" if layers == "triton" else "torch").eval()
            self.run_layers = self.layers_fn.run
        elif layers == "transformers":
            if hasattr(lm.model.layers[0].self_attn, "qkv_proj"):
                raise ValueError("layers='transformers' needs the separate projections that fuse_projections joined")
            use_grouped_attention(lm)
            step = ChameleonStep(lm).eval()
            self.layers_fn = lambda ids, positions, kv: step.run(ids, None, positions, kv, grouped_cache=kv)
            self.run_layers = lambda x, positions, kv: step.run_embedded(x, None, positions, kv, grouped_cache=kv)
        else:
            raise ValueError(f"layers must be 'fused', 'triton' or 'transformers', got {layers!r}")
        self.lm = lm
        self.text_head = TextHead(lm).eval()
        self.image_head = image_head.eval()
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.graphs = on_cuda if graphs is None else graphs
        if self.graphs and not on_cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.bucket = attend_bucket or (512 if self.graphs else 1)
        if not (device_loop if device_loop is not None else on_cuda):
            self.decode_plain_image = None  # the decode loop samples on the host
        self.dtype = lm.model.norm.weight.dtype
        self.kv_cache = kv_cache
        self.layers = lm.config.num_hidden_layers
        self.heads, self.head_dim = kv_shape(lm.config)
        self.captured: dict[tuple, tuple] = {}  # shape key -> (graph, its outputs)
        self.capture_s = 0.0
        self.pool = None  # one memory pool for all graphs: they never run concurrently
        self.chain: _ChainState | None = None
        # Buffers and graphs outlive a batch: the next batch of the same shape (the next tiles of a photo,
        # the next photo of the same size) reuses them instead of capturing ~35 graphs again (43 s -> 40 s
        # for a 512² restoration on an H200, docs/gpu.md).
        self.shape: tuple | None = None  # (batch, capacity, unconditional capacity, widest call, prompt) of self.kv
        self.chain_cache: _ChainState | None = None  # the last chained decode's buffers, see _chain_state

    # --- the Decoder protocol -------------------------------------------------------------

    def prefill(self, prompts, capacity: int, max_step: int, unconditional_capacity: int | None = None) -> np.ndarray:
        batch, longest = len(prompts), max(len(p) for p in prompts)
        capacity = max(capacity, longest)
        shape = (batch, capacity, unconditional_capacity or capacity, max(max_step, longest), longest)
        if shape == self.shape:
            self.kv.reset()  # same buffers: the graphs captured for the previous batch replay as they are
        else:
            self.kv = None  # free the old cache before allocating the new one
            # the conditional rows' first ``longest`` slots are the prompt (an int4 cache holds them at int8)
            groups = [(batch, capacity, longest), (batch, shape[2])]
            self.kv = GroupedKV(self.layers, self.heads, self.head_dim, groups, shape[3],
                                self.dtype, self.device, self.kv_cache, getattr(self.layers_fn, "triton", None))
            self.shape, self.chain_cache = shape, None
            self.captured.clear()  # graphs hold the old batch's buffers
            self.step_inputs: dict[tuple[int, int], torch.Tensor] = {}
            self.text_inputs: dict[tuple[int, int], torch.Tensor] = {}  # embeddings, with the vocabulary split
        self.lengths = np.zeros(2 * batch, np.int64)
        self.batch, self.live, self.max_step = batch, batch, max_step
        ids = np.zeros((batch, longest), np.int64)  # right-padded; the padding is rewound below
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
        last = np.array([len(p) - 1 for p in prompts])
        final = None
        # in chunks: a 512² tile's 4.2k-token prompt in one call would hold ~0.5 GB of the 7B's activations
        # (per row), the widest call of the whole decode and what the memory plan's workspace is sized by
        with torch.inference_mode():
            for start in range(0, longest, PREFILL_CHUNK):
                hidden = self._forward(self._embed(ids[:, start:start + PREFILL_CHUNK], image=False))
                final = hidden[:, 0].clone() if final is None else final
                ends = np.flatnonzero((last >= start) & (last < start + hidden.shape[1]))
                if len(ends):
                    rows = torch.as_tensor(ends, device=self.device)
                    final[rows] = hidden[rows, torch.as_tensor(last[ends] - start, device=self.device)]
        self.rewind(longest - 1 - last)
        return self._logits(final, image=False)

    def begin_unconditional(self) -> None:
        self.live = 2 * self.batch  # rows B..2B-1 start empty: length 0, positions from 0
        self.lengths[self.batch:] = 0
        self.kv.live = 2
        self.kv.groups[1].lengths.zero_()

    def step(self, ids: np.ndarray, image: bool = False, all_positions: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[0] != self.live:
            raise ValueError(f"step got {ids.shape[0]} rows, the decoder has {self.live} live rows")
        if self.graphs:
            return self._captured_step(ids, image, all_positions)
        hidden = self._forward(self._embed(ids, image))
        return self._logits(hidden if all_positions else hidden[:, -1], image)

    def rewind(self, counts: np.ndarray) -> None:
        self.lengths[:self.live] -= np.asarray(counts, dtype=np.int64)
        for group, part in zip(self.kv.live_groups, np.split(self.lengths[:self.live], self.kv.live)):
            group.lengths.copy_(torch.from_numpy(part))

    # --- plain image decoding chained on the device -----------------------------------------

    @torch.inference_mode()
    def decode_plain_image(self, header: Sequence[int], side: int, config: SamplingConfig, seeds: Sequence[int],
                           image_ids: np.ndarray, row_end: int,
                           progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Decode every restoration's side x side codes after ``header``, plain (no speculation).

        Restoration i draws its j-th code with ``counter_uniforms(fold_seed(seeds[i]), j)``.
        Returns (codes (B, side²) int64, entropies (B, side²) float32, decoder calls).
        ``progress(codes done per restoration)`` is called after every image row, once the
        device has finished it.
        """
        hidden = self._forward(self._embed(np.tile(np.asarray(header, np.int64), (self.live, 1)), image=True))
        state = self.chain = self._chain_state(self.image_head(hidden[:, -1]), side * side, config, seeds,
                                               image_ids, row_end)
        total = side * side
        for index in range(total):
            t = 0 if index == total - 1 else (2 if index % side == side - 1 else 1)
            self._run_link(t)
            if index % side == side - 1:
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                if progress is not None:
                    progress(index + 1)
        # copies: the buffers are the next decode's (on CPU .cpu() would hand out the buffer itself)
        codes = state.codes.cpu().numpy().copy()
        entropy = state.entropy.cpu().numpy().astype(np.float32)
        self.chain = None
        return codes, entropy, total

    def _chain_state(self, logits: torch.Tensor, total: int, config: SamplingConfig, seeds: Sequence[int],
                     image_ids: np.ndarray, row_end: int) -> _ChainState:
        """The chained decode's buffers: the previous decode's, refilled in place, when everything its
        captured links baked in is the same (so they replay on them); else new ones, and the old links go."""
        dev = self.device
        folded = torch.tensor([sampler.fold_seed(s) for s in seeds], dtype=torch.int64, device=dev)
        # every uniform the decode can draw, hashed now in one go: a lookup per step instead of ~60 small kernels
        uniforms = sampler.counter_uniforms(folded.unsqueeze(1), torch.arange(total, device=dev))
        ids = torch.as_tensor(np.array(image_ids, np.int64), device=dev)
        state = self.chain_cache
        if (state is not None and state.config == config and state.codes.shape == (self.batch, total)
                and state.row_end == row_end and torch.equal(state.image_ids, ids)):
            state.logits.copy_(logits)
            state.uniforms.copy_(uniforms)
            state.counter.zero_()
            return state
        self.captured = {key: entry for key, entry in self.captured.items() if key[0] != "link"}
        state = self.chain_cache = _ChainState(
            logits=logits,
            codes=torch.zeros((self.batch, total), dtype=torch.int64, device=dev),
            entropy=torch.zeros((self.batch, total), dtype=torch.float64 if dev.type != "mps" else torch.float32,
                                device=dev),
            counter=torch.zeros((), dtype=torch.int64, device=dev),
            uniforms=uniforms, image_ids=ids,
            ids={1: torch.zeros((self.live, 1), dtype=torch.int64, device=dev),
                 2: torch.full((self.live, 2), row_end, dtype=torch.int64, device=dev)},
            config=config, cfg=config.uses_cfg, batch=self.batch, row_end=row_end,
        )
        return state

    def _link(self, t: int, call: tuple) -> None:
        """Draw every restoration's next code from ``chain.logits``; then, if t > 0, feed it (with a row end
        when t == 2) and leave the next logits in ``chain.logits``. Device work only: capturable."""
        s = self.chain
        b = s.batch
        column = s.counter.view(1)
        uniforms = s.uniforms.index_select(1, column).squeeze(1)
        code, entropy = sampler.image_codes(s.logits[:b], s.logits[b:] if s.cfg else None, s.config, uniforms)
        s.codes.index_copy_(1, column, code.unsqueeze(1))
        s.entropy.index_copy_(1, column, entropy.to(s.entropy.dtype).unsqueeze(1))
        s.counter += 1
        if t == 0:
            return
        token = s.image_ids[code]
        ids = s.ids[t]
        ids[:, 0].copy_(torch.cat([token, token]) if s.cfg else token)
        s.logits.copy_(self.image_head(self._append(self._embed_on_device(ids, image=True), call)[:, -1]))

    @torch.inference_mode()
    def _run_link(self, t: int) -> None:
        call = self._call(t)
        if self.graphs:
            self._replay(("link", t, call), lambda: self._link(t, call))
        else:
            self._link(t, call)
        self.lengths[:self.live] += t

    # --- CUDA graphs ----------------------------------------------------------------------

    @torch.inference_mode()
    def _captured_step(self, ids: np.ndarray, image: bool, all_positions: bool) -> np.ndarray:
        """``step`` through a captured graph: the call is padded to a power-of-two width (the padding is
        rewound at once), so text steps and speculative windows reuse a few shapes."""
        rows, t = ids.shape
        width = min(1 << (t - 1).bit_length(), max(self.max_step, t))
        call = self._call(width)
        padded = np.empty((rows, width), np.int64)
        padded[:, :t], padded[:, t:] = ids, ids[:, -1:]
        host_text = self.vocab is not None and not image  # embedded and scored off the device, around the graph
        if host_text:
            x = self._embed(padded, image=False)
            buffer = self.text_inputs.get((rows, width))
            if buffer is None:
                buffer = self.text_inputs[(rows, width)] = torch.zeros_like(x)
            buffer.copy_(x)
        else:
            buffer = self.step_inputs.get((rows, width))
            if buffer is None:
                buffer = self.step_inputs[(rows, width)] = torch.zeros((rows, width), dtype=torch.int64,
                                                                       device=self.device)
            buffer.copy_(torch.from_numpy(padded))
        last = slice(None) if all_positions else slice(t - 1, t)
        key = ("step", rows, width, call, image)
        outputs = self._replay(key, lambda: self._graph_step(buffer, call, image))
        self.lengths[:self.live] += width
        outputs = outputs[:, last]
        # read before any other graph reuses the pool
        logits = (self.vocab.text_logits(outputs.to(self.vocab.text_device)) if host_text else outputs).cpu().numpy()
        self.rewind(np.full(self.live, width - t))
        return logits if all_positions else logits[:, 0]

    def _graph_step(self, inputs: torch.Tensor, call: tuple, image: bool) -> torch.Tensor:
        """One decoder call on device buffers (ids, or embeddings for text embedded off the device); returns every
        position's logits, or for text scored off the device its hidden states (capturable)."""
        x = inputs if inputs.is_floating_point() else self._embed_on_device(inputs, image)
        hidden = self._append(x, call)
        if image:
            return self.image_head(hidden)
        return hidden if self.vocab is not None else self.text_head(hidden)

    def _replay(self, key: tuple, body: Callable[[], object]):
        """Replay the graph captured for ``key`` (capturing it on first use); returns what ``body`` returned
        at capture, whose memory the replay refills. Off CUDA (the tests' CPU check of this path) the body
        runs eagerly: same shapes, same buffers, no capture."""
        if self.device.type != "cuda":
            return body()
        entry = self.captured.get(key)
        if entry is None:
            try:
                entry = self.captured[key] = self._capture(body)
            except RuntimeError as exc:  # e.g. a quantized layer whose kernel cannot be captured
                warnings.warn(f"CUDA graph capture failed, this batch decodes eagerly: {str(exc)[:200]}",
                              RuntimeWarning, stacklevel=2)
                self.graphs = False
                return body()
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, body: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        """Warm ``body`` up once (on a side stream, as capture requires), undo its effect on the lengths and
        the chain, then capture it. The warm-up writes the same cache slots the replay writes again.

        ``capture_s`` counts this call only: the steps the host queued before it are drained first, outside
        the timer (counted inside, they made a 512² restoration's capture look like 14 s instead of ~3 s on
        an H200: docs/gpu.md)."""
        torch.cuda.current_stream(self.device).synchronize()
        start = time.perf_counter()
        s = self.chain
        lengths = [g.lengths.clone() for g in self.kv.live_groups]
        chain = [] if s is None else [(s.logits, s.logits.clone()), (s.counter, s.counter.clone())]
        side_stream = torch.cuda.Stream(self.device)
        side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side_stream):
            body()
        torch.cuda.current_stream(self.device).wait_stream(side_stream)
        for group, saved in zip(self.kv.live_groups, lengths):
            group.lengths.copy_(saved)
        for tensor, saved in chain:
            tensor.copy_(saved)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = body()
        torch.cuda.current_stream(self.device).synchronize()
        self.capture_s += time.perf_counter() - start
        return graph, outputs

    # --- internals ------------------------------------------------------------------------

    def _call(self, t: int) -> tuple:
        """What a call of t tokens per live row reads and writes, decided on the host (so a captured graph's key
        holds it): per live group the slots attention reads (the longest row's, rounded up to the bucket) and,
        for an int4 cache, which part its slots fall in: "prompt" (all before the prompt's end: a prefill),
        "packed" (all after: every decode step once the shortest prompt is passed) or "both", so a step
        quantizes its tokens only to the part they go to (None for other caches)."""
        spans, parts = [], []
        for group, lengths in zip(self.kv.live_groups, np.split(self.lengths[:self.live], self.kv.live)):
            shortest, needed = int(lengths.min()), int(lengths.max()) + t
            if needed > group.capacity:
                raise GenerationError(f"KV cache capacity {group.capacity} exceeded")
            spans.append(min(group.capacity, math.ceil(max(needed, 1) / self.bucket) * self.bucket))
            parts.append("prompt" if needed <= group.prompt else "packed" if shortest >= group.prompt else "both")
        return tuple(spans), tuple(parts) if self.kv_cache == "int4" else None

    @torch.inference_mode()
    def _embed(self, ids: np.ndarray, image: bool) -> torch.Tensor:
        """Host ids (R, T) -> their input embeddings on the device."""
        if self.vocab is not None and not image:
            return self.vocab.embed_text(ids)
        return self._embed_on_device(torch.as_tensor(ids, device=self.device), image)

    def _embed_on_device(self, ids: torch.Tensor, image: bool) -> torch.Tensor:
        """Device ids (R, T) -> embeddings (capturable); with the vocabulary split only image-phase ids."""
        if self.vocab is not None:
            return self.vocab.embed_image(ids)
        return self.lm.model.embed_tokens(ids)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Append embeddings x (R, T, hidden) to the live rows, eagerly; returns their final-norm hidden states."""
        hidden = self._append(x, self._call(x.shape[1]))
        self.lengths[:self.live] += x.shape[1]
        return hidden

    def _append(self, x: torch.Tensor, call: tuple) -> torch.Tensor:
        """The decoder call on the device: place embeddings x (R, T, hidden) at the rows' device-side lengths, run
        the layers over the grouped cache, move the lengths on. Host lengths are the caller's (capturable);
        ``call`` is ``_call``'s, decided from them."""
        positions = self.kv.prepare(x.shape[1], *call)
        hidden = self.run_layers(x, positions, self.kv)
        self.kv.advance(x.shape[1])
        return hidden

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor, image: bool) -> np.ndarray:
        if image:
            return self.image_head(hidden).cpu().numpy()
        return (self.vocab.text_logits if self.vocab is not None else self.text_head)(hidden).cpu().numpy()


@dataclass
class _ChainState:
    """The device tensors a chained image decode reads and writes in place (a graph's fixed addresses)."""

    logits: torch.Tensor  # (rows, codebook): the outputs the next code is drawn from
    codes: torch.Tensor  # (B, side²) int64
    entropy: torch.Tensor  # (B, side²)
    counter: torch.Tensor  # () int64: the index of the next code
    uniforms: torch.Tensor  # (B, side²): code j of restoration i draws at counter_uniforms(fold_seed(seed i), j)
    image_ids: torch.Tensor  # (codebook,) token id of each code
    ids: dict[int, torch.Tensor]  # step width (1, or 2 with the row end) -> (rows, width) input buffer
    config: SamplingConfig
    cfg: bool
    batch: int
    row_end: int
