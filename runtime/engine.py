"""The deploy-time engine: an exported folder served with NumPy + ONNX Runtime, never torch.

The KV cache is allocated once per restoration, for the whole sequence: one
(2, heads, capacity, head_dim) buffer per layer and key/value (batch 2 reserved for CFG).
Every call binds those buffers as the graph's ``past`` input and a small preallocated
scratch as its ``new_key_values`` output; the graph attends over the cache slots without
copying them (see pure_lite.torch_backend.chameleon.ChameleonStep), and the engine then writes the T new keys
and values into their slots. Nothing is concatenated or reallocated per step. The decoder's
last hidden state then goes through the text head (all logits) or, inside an image, the
image head (the image tokens' logits only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pure_lite.components import PURE_IMAGE_SIZE, PURE_SCALE, Components
from pure_lite.errors import GenerationError, ManifestError, MissingDependencyError
from pure_lite.manifest import Manifest
from pure_lite.prompt import TextTokenizer
from pure_lite.tokens import TokenLayout

from .providers import device_of, onnxruntime, select_providers

# Every cache view's slot count is a multiple of this. The graph scores a row's past slots and then
# its new keys in one softmax: with the view's width aligned, a new key always falls into the same
# SIMD lane (AVX2 has 8 floats, AVX-512 16), so its row's sum adds the same terms in the same
# order whatever the width is, whatever the other rows in the batch need (docs/decoding.md).
SLOT_ALIGN = 64


def even_rows(rows: int) -> int:
    """How many rows a quantized matmul over ``rows`` rows is given: the next even number.

    ONNX Runtime's ``MatMulNBits`` (``accuracy_level=4``) on AVX-512 multiplies rows in pairs and
    a lone last row with a one-row kernel that rounds differently, so a row's output would depend
    on whether its call had an odd number of rows, i.e. on its batch (docs/decoding.md,
    "Determinism"). With an even count every row goes through the pair kernel. The spare row is
    computed and dropped.
    """
    return rows + rows % 2


class KVBuffers:
    """The cache of a batch of restorations, plus scratch outputs for one call's new keys/values and
    hidden states, allocated once.

    Each layer's keys (and values) are one flat allocation for ``capacity`` slots per row, viewed
    as (rows, heads, slots, head_dim) with ``slots`` only as large as the longest row needs. The
    graph attends over every slot it is given, and reading the cache is most of a step's memory
    traffic at small and mid size (far more than the weights once several tiles decode
    together), so the view grows with the rows: ``reserve`` re-lays the rows out in place, a few
    times per restoration, and nothing is ever reallocated. Slot counts are multiples of
    ``SLOT_ALIGN``, so a row's logits do not depend on how wide its batch's view is.
    """

    allocations = 0  # class-wide count, so tests can assert one allocation per restoration batch

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, head_dim: int, max_new: int,
                 hidden_size: int, device: str):
        KVBuffers.allocations += 1
        if device == "cpu":
            xp = np
        else:
            try:
                import cupy as xp
            except ImportError as exc:
                raise MissingDependencyError(
                    "serving on CUDA keeps the KV cache on the GPU with CuPy: pip install 'pure-lite[gpu]' (cupy-cuda12x)"
                ) from exc
        self.xp, self.device = xp, device
        capacity = -(-capacity // SLOT_ALIGN) * SLOT_ALIGN
        self.flat = [xp.zeros(rows * heads * capacity * head_dim, dtype=xp.float32) for _ in range(2 * layers)]
        self.scratch = [xp.zeros(rows * heads * max_new * head_dim, dtype=xp.float32) for _ in range(2 * layers)]
        self.hidden = np.zeros(rows * max_new * hidden_size, np.float32)
        self.rows, self.heads, self.head_dim = rows, heads, head_dim
        self.capacity, self.max_new, self.slots = capacity, max_new, 0
        self.cache = self._views()

    def _views(self) -> list:
        """Per layer and key/value: the (rows, heads, slots, head_dim) view the graph reads."""
        n = self.rows * self.heads * self.slots * self.head_dim
        return [f[:n].reshape(self.rows, self.heads, self.slots, self.head_dim) for f in self.flat]

    def reserve(self, slots: int, filled: np.ndarray) -> bool:
        """Make every row hold at least ``slots`` slots (with some headroom), keeping the first
        ``filled[r]`` slots of each row r. Returns whether the layout changed (the graph's past
        inputs must then be bound again).

        Each (row, head) block moves from its old stride to the new one, last block first: its
        new place lies at or after its old one and after every block not moved yet, so no
        block is overwritten before it has moved. Only a row's filled slots move (rows fill
        unevenly: the CFG rows hold only the image so far). Only the first few blocks, whose new
        place overlaps their old one, go through a temporary of their own (an overlapping
        assignment is not safe with every array library); a whole-cache temporary had doubled
        these moves' traffic.
        """
        if slots <= self.slots:
            return False
        grown = max(slots, self.slots + self.slots // 8, SLOT_ALIGN)
        grown = min(self.capacity, -(-grown // SLOT_ALIGN) * SLOT_ALIGN)
        d = self.head_dim
        old, new = self.slots * d, grown * d
        moves = [(block, int(filled[block // self.heads]) * d) for block in range(self.rows * self.heads - 1, 0, -1)]
        for f in self.flat:
            for block, n in moves:
                if n:
                    source = f[block * old:block * old + n]
                    f[block * new:block * new + n] = source.copy() if block * (new - old) < n else source
        self.slots = grown
        self.cache = self._views()
        return True

    def pointer(self, array) -> int:
        return array.ctypes.data if self.xp is np else array.data.ptr

    def write(self, rows: int, lengths: np.ndarray, new: list, t: int) -> None:
        """Put each row's t new keys/values (rows, heads, t, head_dim) into its slots lengths[r]..+t-1."""
        if (lengths == lengths[0]).all():  # rows in step: one slice per buffer
            p = int(lengths[0])
            for buf, values in zip(self.cache, new):
                buf[:rows, :, p:p + t] = values
            return
        # one (row, head) block per index row, its t slots per column: a gather of head_dim-long runs
        block = self.xp.arange(rows * self.heads)[:, None]
        slot = self.xp.asarray(np.repeat(lengths, self.heads)[:, None] + np.arange(t))
        for buf, values in zip(self.cache, new):
            buf[:rows].reshape(rows * self.heads, self.slots, self.head_dim)[block, slot] = \
                values.reshape(rows * self.heads, t, self.head_dim)


class OnnxDecoder:
    """The runtime's Decoder (see pure_lite.generate): per-row lengths, CFG rows, cache written in place."""

    def __init__(self, sessions: dict, manifest: Manifest, device: str):
        model = manifest.model
        if model.get("kv_contract") != "split-cache-v1" or "image_head" not in manifest.graphs:
            raise ManifestError("this export predates the split-cache decoder contract; export it again")
        if manifest.graphs["decoder"].get("positions") != "all":
            raise ManifestError("this export's decoder returns only the last position (an older pure-lite); "
                                "export it again")
        self.session, self.device = sessions["decoder"], device
        self.layers = model["num_hidden_layers"]
        self.heads, self.head_dim = model["num_key_value_heads"], model["head_dim"]
        self.hidden_size = model["hidden_size"]
        inputs, outputs = manifest.graphs["decoder"]["inputs"], manifest.graphs["decoder"]["outputs"]
        self.past_names, self.new_names = inputs[3:], outputs[1:]
        self.binding = self.session.io_binding()
        self.bound_past = self.bound_new = None  # the (rows, slots) / (rows, t) the binding holds
        # (session, output name, width) per head
        self.text_head = (sessions["lm_head"], "logits", model["vocab_size"])
        self.image_head = (sessions["image_head"], "image_logits", manifest.data["tokens"]["codebook_size"])
        self.kv: KVBuffers | None = None

    def prefill(self, prompts, capacity: int, max_step: int, unconditional_capacity: int | None = None) -> np.ndarray:
        """(``unconditional_capacity`` is not used: every row's buffer has ``capacity`` slots, but
        ``KVBuffers.reserve`` only lays out as many as the longest row needs.)"""
        batch, longest = len(prompts), max(len(p) for p in prompts)
        if even_rows(batch * longest) > batch * longest:
            longest += 1  # one more padding column: batch and longest are odd
        capacity = max(capacity, longest)
        self.kv = KVBuffers(self.layers, 2 * batch, self.heads, capacity, self.head_dim, max_step,
                            self.hidden_size, self.device)
        self.lengths = np.zeros(2 * batch, np.int64)
        self.slot_index = np.arange(self.kv.capacity + max_step, dtype=np.int64)
        self.batch, self.live = batch, batch
        self.bound_past = self.bound_new = None
        ids = np.zeros((batch, longest), np.int64)  # right-padded; the padding is rewound below
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
        hidden = self._prompt(ids)
        self.rewind(np.array([longest - len(p) for p in prompts]))
        last = hidden[np.arange(batch), [len(p) - 1 for p in prompts]]
        return self._head(np.ascontiguousarray(last), image=False)

    def begin_unconditional(self) -> None:
        """Rows B..2B-1 join empty: length 0, positions from 0."""
        self.live = 2 * self.batch
        self.lengths[self.batch:] = 0

    def step(self, ids: np.ndarray, image: bool = False, all_positions: bool = False) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        rows, t = ids.shape
        if rows != self.live:
            raise ValueError(f"step got {rows} rows, the decoder has {self.live} live rows")
        kv, lengths = self.kv, self.lengths[:rows]
        if int(lengths.max()) + t > kv.capacity or t > kv.max_new:
            raise GenerationError(f"KV cache capacity {kv.capacity} exceeded")
        if kv.reserve(int(lengths.max()) + t, self.lengths):
            self.bound_past = None
        slots = kv.slots
        real = rows
        if even_rows(rows * t) > rows * t:
            # An even number of matmul rows (even_rows). rows is then odd, so below the 2 * batch
            # rows the cache holds: the spare is the next row (a CFG row not live yet), fed as an
            # empty row; its outputs land in scratch and are never written into the cache.
            rows += 1
            ids = np.concatenate([ids, ids[-1:]])
            lengths = np.append(lengths, 0)
        mask = np.ones((rows, slots + t), np.int64)
        np.less(self.slot_index[:slots], lengths[:, None], out=mask[:, :slots])
        bind = self.binding
        bind.bind_cpu_input("input_ids", ids)
        bind.bind_cpu_input("attention_mask", mask)
        bind.bind_cpu_input("position_ids", lengths[:, None] + self.slot_index[:t])
        # The cache, the new keys/values and the hidden states live in fixed buffers: bound again
        # only when the shapes their views take change (a few times per restoration), not per call.
        if self.bound_past != (rows, slots):
            past_shape = [rows, self.heads, slots, self.head_dim]
            for name, buf in zip(self.past_names, kv.cache):
                bind.bind_input(name, kv.device, 0, np.float32, past_shape, kv.pointer(buf))
            self.bound_past = (rows, slots)
        new_shape = [rows, self.heads, t, self.head_dim]
        if self.bound_new != (rows, t):
            for name, buf in zip(self.new_names, kv.scratch):
                bind.bind_output(name, kv.device, 0, np.float32, new_shape, kv.pointer(buf))
            bind.bind_output("hidden", "cpu", 0, np.float32, [rows, t, self.hidden_size], kv.hidden.ctypes.data)
            self.bound_new = (rows, t)
        self.session.run_with_iobinding(bind)
        rows, lengths = real, self.lengths[:real]
        n = rows * self.heads * t * self.head_dim
        kv.write(rows, lengths, [buf[:n].reshape(rows, self.heads, t, self.head_dim) for buf in kv.scratch], t)
        lengths += t
        hidden = kv.hidden[:rows * t * self.hidden_size].reshape(rows, t, self.hidden_size)
        if all_positions:
            return self._head(hidden.reshape(rows * t, -1), image).reshape(rows, t, -1)
        return self._head(np.ascontiguousarray(hidden[:, -1]), image)

    def rewind(self, counts: np.ndarray) -> None:
        self.lengths[:self.live] -= np.asarray(counts, dtype=np.int64)

    def _prompt(self, ids: np.ndarray) -> np.ndarray:
        """The prompts' call: no cache slots bound (scoring the prompt against `capacity` empty slots
        would be most of the prefill's attention work); its keys/values come back from ONNX Runtime
        and are written into the cache once. Returns the hidden states (rows, T, hidden)."""
        rows, t = ids.shape
        empty = np.zeros((rows, self.heads, 0, self.head_dim), np.float32)
        feeds = {"input_ids": ids, "attention_mask": np.ones((rows, t), np.int64),
                 "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(t), (rows, t)), dtype=np.int64),
                 **{name: empty for name in self.past_names}}
        hidden, *new = self.session.run(None, feeds)
        self.kv.reserve(t, self.lengths)
        self.kv.write(rows, self.lengths[:rows], [self.kv.xp.asarray(v) for v in new], t)
        self.lengths[:rows] += t
        return hidden

    def _head(self, hidden: np.ndarray, image: bool) -> np.ndarray:
        session, name, _ = self.image_head if image else self.text_head
        rows = len(hidden)
        if even_rows(rows) > rows:
            hidden = np.concatenate([hidden, hidden[-1:]])
        return session.run([name], {"hidden": hidden})[0][:rows]


class OnnxCodec:
    """VQ encode/decode graphs (pixels 1x3xHxW in [-1, 1] <-> codes h x w)."""

    def __init__(self, encoder, decoder):
        self.encoder, self.decoder = encoder, decoder

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"pixels": pixels})[0][0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {"codes": np.ascontiguousarray(codes[None], dtype=np.int64)})[0]


def load_components(export_dir: str | Path, *, providers: Sequence[str] | None = None,
                    verify_checksums: bool = True) -> Components:
    """Open an exported folder: check its manifest, then one ONNX Runtime session per graph."""
    ort = onnxruntime()
    manifest = Manifest.load(export_dir, verify_checksums=verify_checksums)
    chosen = select_providers(providers)
    device = device_of(chosen)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Decoder and head sessions run back to back: threads that spin-wait after one session's run
    # steal the cores from the next (measured on 2 cores: 43 -> 69 image steps/s with spinning off).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(graph: str):
        path = manifest.path(graph)  # checked by Manifest.load: inside the folder, checksum verified
        try:
            return ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ManifestError(f"ONNX Runtime cannot open {path}: {exc}") from exc

    tokens = manifest.data["tokens"]
    layout = TokenLayout.from_tokenizer_file(manifest.tokenizer_path, vocab_size=tokens["vocab_size"])
    if (layout.image_start, layout.end_of_turn) != (tokens["image_start"], tokens["end_of_turn"]):
        raise ManifestError(f"{export_dir}: tokenizer.json disagrees with the manifest's token layout")
    lm_sessions = {name: session(name) for name in ("decoder", "lm_head", "image_head")}
    codec = OnnxCodec(session("vq_encoder"), session("vq_decoder"))
    return Components(
        layout=layout,
        tokenizer=TextTokenizer(manifest.tokenizer_path),
        codec=codec,
        new_decoder=lambda: OnnxDecoder(lm_sessions, manifest, device),
        max_positions=manifest.model["max_position_embeddings"],
        image_size=manifest.model.get("image_size", PURE_IMAGE_SIZE),
        trained_scale=manifest.model.get("scale", PURE_SCALE),
        description=f"onnxruntime ({', '.join(chosen)}; weights {manifest.quantization})",
    )
