"""The deploy-time engine: an exported folder served with NumPy + ONNX Runtime, never torch.

The KV cache is allocated once per restoration, for the whole sequence, as two
ping-pong buffers per layer and per key/value. Each call binds the first
B*heads*P*head_dim elements of one buffer as ``past`` (shape (B, heads, P, head_dim)) and
the first B*heads*(P+T)*head_dim of the other as ``present``: the graph writes the grown
cache straight into preallocated memory, nothing is concatenated or reallocated in
Python, and the buffers swap roles for the next call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pure_lite.components import Components
from pure_lite.errors import GenerationError, ManifestError
from pure_lite.manifest import Manifest
from pure_lite.prompt import TextTokenizer
from pure_lite.tokens import TokenLayout

from .providers import device_of, onnxruntime, select_providers


class KVBuffers:
    """Ping-pong KV storage for one restoration: 2 buffers x (key, value) x layers, allocated once."""

    allocations = 0  # class-wide count, so tests can assert one allocation per restoration

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, device: str):
        KVBuffers.allocations += 1
        self.shape_unit = heads * head_dim
        size = batch * heads * capacity * head_dim
        ort = onnxruntime()
        if device == "cpu":
            self.buffers = [[np.zeros(size, np.float32) for _ in range(2 * layers)] for _ in range(2)]
            self.ptrs = [[b.ctypes.data for b in side] for side in self.buffers]
        else:
            zeros = np.zeros(size, np.float32)  # zero-filled so never-written rows hold finite values
            self.buffers = [[ort.OrtValue.ortvalue_from_numpy(zeros, device, 0)
                             for _ in range(2 * layers)] for _ in range(2)]
            self.ptrs = [[b.data_ptr() for b in side] for side in self.buffers]
        self.capacity, self.batch, self.device = capacity, batch, device
        self.current = 0  # which side holds ``past``


class OnnxDecoder:
    """The runtime's Decoder (see pure_lite.generate): prefill, CFG as batch 2, in-place KV cache."""

    def __init__(self, session, manifest: Manifest, device: str):
        model = manifest.model
        self.session, self.device = session, device
        self.layers = model["num_hidden_layers"]
        self.heads, self.head_dim = model["num_key_value_heads"], model["head_dim"]
        self.vocab = model["vocab_size"]
        inputs, outputs = manifest.graphs["decoder"]["inputs"], manifest.graphs["decoder"]["outputs"]
        self.past_names, self.present_names = inputs[3:], outputs[1:]
        self.binding = session.io_binding()
        self.kv: KVBuffers | None = None

    def prefill(self, ids: np.ndarray, capacity: int) -> np.ndarray:
        # Batch 2 is reserved from the start: the unconditional branch joins inside the same buffers.
        self.kv = KVBuffers(self.layers, 2, self.heads, capacity, self.head_dim, self.device)
        self.logits = np.zeros((2, self.vocab), np.float32)
        self.mask = np.zeros((2, capacity), np.int64)
        self.batch, self.length = 1, 0
        self.next_pos = np.zeros(2, np.int64)
        return self._run(ids)

    def begin_unconditional(self) -> None:
        """Widen to batch 2 in place: (1, H, P, D) and row 0 of (2, H, P, D) share the same leading elements.

        Row 1 holds no real past; its mask is 0 there, so its values are never weighted (any
        finite content gives the same result; on CPU it is zeroed anyway).
        """
        kv, p = self.kv, self.length
        if self.device == "cpu":
            n = self.heads * p * self.head_dim
            for buf in kv.buffers[kv.current]:
                buf[n:2 * n] = 0.0
        self.batch = 2
        self.mask[1, :p] = 0
        self.next_pos[1] = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        b, t, p = self.batch, len(ids), self.length
        kv = self.kv
        if p + t > kv.capacity:
            raise GenerationError(f"KV cache capacity {kv.capacity} exceeded")
        self.mask[:b, p:p + t] = 1
        bind = self.binding
        bind.bind_cpu_input("input_ids", np.ascontiguousarray(np.broadcast_to(ids, (b, t)), dtype=np.int64))
        bind.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:b, :p + t]))
        bind.bind_cpu_input("position_ids", (self.next_pos[:b, None] + np.arange(t)).astype(np.int64))
        past, present = kv.ptrs[kv.current], kv.ptrs[1 - kv.current]
        past_shape = [b, self.heads, p, self.head_dim]
        present_shape = [b, self.heads, p + t, self.head_dim]
        for i, name in enumerate(self.past_names):
            bind.bind_input(name, kv.device, 0, np.float32, past_shape, past[i])
        for i, name in enumerate(self.present_names):
            bind.bind_output(name, kv.device, 0, np.float32, present_shape, present[i])
        bind.bind_output("logits", "cpu", 0, np.float32, [b, self.vocab], self.logits.ctypes.data)
        self.session.run_with_iobinding(bind)
        kv.current = 1 - kv.current
        self.length = p + t
        self.next_pos[:b] += t
        return self.logits[:b]


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

    def session(graph: str):
        try:
            return ort.InferenceSession(str(manifest.path(graph)), options, providers=chosen)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ManifestError(f"ONNX Runtime cannot open {manifest.path(graph)}: {exc}") from exc

    tokens = manifest.data["tokens"]
    layout = TokenLayout.from_tokenizer_file(manifest.root / tokens["tokenizer"], vocab_size=tokens["vocab_size"])
    if (layout.image_start, layout.end_of_turn) != (tokens["image_start"], tokens["end_of_turn"]):
        raise ManifestError(f"{export_dir}: tokenizer.json disagrees with the manifest's token layout")
    decoder = session("decoder")
    codec = OnnxCodec(session("vq_encoder"), session("vq_decoder"))
    return Components(
        layout=layout,
        tokenizer=TextTokenizer(manifest.root / tokens["tokenizer"]),
        codec=codec,
        new_decoder=lambda: OnnxDecoder(decoder, manifest, device),
        max_positions=manifest.model["max_position_embeddings"],
        description=f"onnxruntime ({', '.join(chosen)}; weights {manifest.quantization})",
    )
