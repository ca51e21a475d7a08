"""The deploy-time engine: an exported folder served with NumPy + ONNX Runtime, never torch.

The KV cache is allocated once per restoration, for the whole sequence: one
(2, heads, capacity, head_dim) buffer per layer and key/value (batch 2 reserved for CFG).
Every call binds those buffers as the graph's ``past`` input and a small preallocated
scratch as its ``new_key_values`` output; the graph attends over the cache slots without
copying them (see pure_lite.lm.ChameleonStep), and the engine then writes the T new keys
and values into their slots. Nothing is concatenated or reallocated per step. The decoder's
last hidden state then goes through the text head (all logits) or, inside an image, the
image head (the image tokens' logits only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pure_lite.components import PURE_IMAGE_SIZE, Components
from pure_lite.errors import GenerationError, ManifestError, MissingDependencyError
from pure_lite.manifest import Manifest
from pure_lite.prompt import TextTokenizer
from pure_lite.tokens import TokenLayout

from .providers import device_of, onnxruntime, select_providers


class KVBuffers:
    """The cache of one restoration: (2, heads, capacity, head_dim) per layer and key/value, plus a
    scratch output for the newest tokens, allocated once."""

    allocations = 0  # class-wide count, so tests can assert one allocation per restoration

    def __init__(self, layers: int, heads: int, capacity: int, head_dim: int, max_new: int, device: str):
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
        self.cache = [xp.zeros((2, heads, capacity, head_dim), dtype=xp.float32) for _ in range(2 * layers)]
        self.scratch = [xp.zeros(2 * heads * max_new * head_dim, dtype=xp.float32) for _ in range(2 * layers)]
        self.capacity, self.max_new = capacity, max_new

    def pointer(self, array) -> int:
        return array.ctypes.data if self.xp is np else array.data.ptr


class OnnxDecoder:
    """The runtime's Decoder (see pure_lite.generate): prefill, CFG as batch 2, cache written in place."""

    def __init__(self, sessions: dict, manifest: Manifest, device: str):
        model = manifest.model
        if model.get("kv_contract") != "split-cache-v1" or "image_head" not in manifest.graphs:
            raise ManifestError("this export predates the split-cache decoder contract; export it again")
        self.session, self.device = sessions["decoder"], device
        self.layers = model["num_hidden_layers"]
        self.heads, self.head_dim = model["num_key_value_heads"], model["head_dim"]
        self.hidden_size = model["hidden_size"]
        inputs, outputs = manifest.graphs["decoder"]["inputs"], manifest.graphs["decoder"]["outputs"]
        self.past_names, self.new_names = inputs[3:], outputs[1:]
        self.binding = self.session.io_binding()
        # (session, binding, output name, width) per head
        self.text_head = (sessions["lm_head"], sessions["lm_head"].io_binding(), "logits", model["vocab_size"])
        codebook = manifest.data["tokens"]["codebook_size"]
        self.image_head = (sessions["image_head"], sessions["image_head"].io_binding(), "image_logits", codebook)
        self.kv: KVBuffers | None = None

    def prefill(self, ids: np.ndarray, capacity: int) -> np.ndarray:
        capacity = max(capacity, len(ids))
        self.kv = KVBuffers(self.layers, self.heads, capacity, self.head_dim, max(len(ids), 3), self.device)
        self.hidden = np.zeros((2, self.hidden_size), np.float32)
        self.outputs = {head[2]: np.zeros((2, head[3]), np.float32) for head in (self.text_head, self.image_head)}
        self.valid = np.zeros((2, capacity), np.int64)  # which cache slots hold real positions, per row
        self.batch, self.length = 1, 0
        self.next_pos = np.zeros(2, np.int64)
        return self._run(ids, image=False)

    def begin_unconditional(self) -> None:
        """Row 1 joins with no past: its slots stay invalid (mask 0) and its positions start at 0."""
        self.batch = 2
        self.valid[1] = 0
        self.next_pos[1] = 0

    def step(self, ids: np.ndarray, image: bool = False) -> np.ndarray:
        return self._run(ids, image)

    def _run(self, ids: np.ndarray, image: bool) -> np.ndarray:
        b, t, p = self.batch, len(ids), self.length
        kv = self.kv
        if p + t > kv.capacity or t > kv.max_new:
            raise GenerationError(f"KV cache capacity {kv.capacity} exceeded")
        # The prompt needs no cache slots at all: binding none skips scoring T queries against
        # `capacity` empty slots (most of the prefill's attention work).
        slots = kv.capacity if p else 0
        mask = np.ones((b, slots + t), np.int64)
        mask[:, :slots] = self.valid[:b, :slots]
        bind = self.binding
        bind.bind_cpu_input("input_ids", np.ascontiguousarray(np.broadcast_to(ids, (b, t)), dtype=np.int64))
        bind.bind_cpu_input("attention_mask", mask)
        bind.bind_cpu_input("position_ids", (self.next_pos[:b, None] + np.arange(t)).astype(np.int64))
        past_shape = [b, self.heads, slots, self.head_dim]
        new_shape = [b, self.heads, t, self.head_dim]
        for name, buf in zip(self.past_names, kv.cache):
            bind.bind_input(name, kv.device, 0, np.float32, past_shape, kv.pointer(buf))
        for name, buf in zip(self.new_names, kv.scratch):
            bind.bind_output(name, kv.device, 0, np.float32, new_shape, kv.pointer(buf))
        bind.bind_output("hidden", "cpu", 0, np.float32, [b, self.hidden_size], self.hidden.ctypes.data)
        self.session.run_with_iobinding(bind)
        n = b * self.heads * t * self.head_dim
        for buf, new in zip(kv.cache, kv.scratch):
            buf[:b, :, p:p + t] = new[:n].reshape(b, self.heads, t, self.head_dim)
        self.valid[:b, p:p + t] = 1
        self.length = p + t
        self.next_pos[:b] += t
        session, head_bind, name, width = self.image_head if image else self.text_head
        head_bind.bind_input("hidden", "cpu", 0, np.float32, [b, self.hidden_size], self.hidden.ctypes.data)
        head_bind.bind_output(name, "cpu", 0, np.float32, [b, width], self.outputs[name].ctypes.data)
        session.run_with_iobinding(head_bind)
        return self.outputs[name][:b]


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
        description=f"onnxruntime ({', '.join(chosen)}; weights {manifest.quantization})",
    )
