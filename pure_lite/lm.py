"""The Chameleon language model in torch: loading, and one decoder call with explicit KV tensors.

``ChameleonStep`` is the contract every backend shares: (input_ids, attention_mask,
position_ids, past keys/values) -> (last-position logits, present keys/values). The
torch backend calls it directly and the ONNX export traces it, so both run the same
maths. It calls the decoder layers and ``lm_head`` itself because the stock
``ChameleonForConditionalGeneration.forward`` masks every image token out of the logits.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointFiles
from .errors import CheckpointError, GenerationError

# Keys the checkpoint may lack: transformers builds Chameleon's own VQ-VAE inside the
# model, which PURE never uses (it has the LlamaGen VQ-8 instead).
_UNUSED_PREFIXES = ("model.vqmodel.",)


def load_language_model(files: CheckpointFiles, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa", quantization_config=None):
    """Load the Chameleon checkpoint strictly: every used weight must be present with its shape."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    config = ChameleonConfig.from_pretrained(files.root)
    if config.vocabulary_map is None:
        # Released PURE configs may omit it; transformers needs it, the tokenizer has it.
        data = json.loads(files.tokenizer.read_text(encoding="utf-8"))
        vocab = dict(data["model"]["vocab"])
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        config.vocabulary_map = vocab
    kwargs = {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model, info = ChameleonForConditionalGeneration.from_pretrained(
            files.root, config=config, dtype=dtype or torch.float32, attn_implementation=attn_implementation,
            output_loading_info=True, **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the language model from {files.root}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(_UNUSED_PREFIXES)]
    bad = missing + list(info.get("mismatched_keys", []))
    if bad:
        raise CheckpointError(f"{files.root}: language-model weights missing or of the wrong shape: {bad[:8]}")
    if quantization_config is None:
        model = model.to(device)
    return model.eval()


class _ExplicitKV:
    """Duck-typed cache for the decoder layers: prepends given past tensors, records the results.

    This is the export contract (past in, grown present out)."""

    def __init__(self, past: tuple[torch.Tensor, ...]):
        self.past = past
        self.present: list[torch.Tensor] = [None] * len(past)  # type: ignore[list-item]

    def update(self, key, value, layer_idx, *args, **kwargs):
        key = torch.cat([self.past[2 * layer_idx], key], dim=2)
        value = torch.cat([self.past[2 * layer_idx + 1], value], dim=2)
        self.present[2 * layer_idx], self.present[2 * layer_idx + 1] = key, value
        return key, value


class StaticKV:
    """Preallocated (2, heads, capacity, head_dim) keys and values per layer, written by position.

    The torch backend's cache: nothing is concatenated or reallocated per step; attention
    reads views of the first ``length + new`` positions of the first ``batch`` rows.
    """

    def __init__(self, layers: int, heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (2, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    def update(self, key, value, layer_idx, *args, **kwargs):
        b, _, t, _ = key.shape
        end = self.length + t
        self.keys[layer_idx][:b, :, self.length:end] = key
        self.values[layer_idx][:b, :, self.length:end] = value
        return self.keys[layer_idx][:b, :, :end], self.values[layer_idx][:b, :, :end]


def additive_mask(attention_mask: torch.Tensor, new_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, P+T) 0/1 key mask to a (B, 1, T, P+T) additive mask that is also causal."""
    total = attention_mask.shape[1]
    past = total - new_tokens
    q = torch.arange(new_tokens, device=attention_mask.device).unsqueeze(1) + past  # (T, 1)
    k = torch.arange(total, device=attention_mask.device).unsqueeze(0)  # (1, P+T)
    allowed = (k <= q).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, T, P+T)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, low).unsqueeze(1)


class ChameleonStep(nn.Module):
    """One decoder call: forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    Shapes: input_ids, position_ids (B, T) int64; attention_mask (B, P+T) int64;
    past_key/value per layer (B, heads, P, head_dim); logits (B, V) of the last position
    (``last_only=False``: (B, T, V)); present (B, heads, P+T, head_dim).
    """

    def __init__(self, lm, last_only: bool = True):
        super().__init__()
        self.model = lm.model
        self.lm_head = lm.lm_head
        self.last_only = last_only

    def run(self, input_ids, attention_mask, position_ids, cache):
        """Logits for new tokens given any cache object with the layers' ``update`` method."""
        hidden = self.model.embed_tokens(input_ids)
        mask = additive_mask(attention_mask, input_ids.shape[1], hidden.dtype)
        rope = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                        use_cache=True, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.model.norm(hidden)
        if self.last_only:
            hidden = hidden[:, -1:]  # (B, 1, hidden): keeps lm_head a MatMul, which weight-only quantizers handle
        logits = self.lm_head(hidden).float()
        return logits[:, -1] if self.last_only else logits

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = _ExplicitKV(past)
        return (self.run(input_ids, attention_mask, position_ids, cache), *cache.present)


def kv_shape(config) -> tuple[int, int]:
    """(heads, head_dim) of the KV cache."""
    heads = config.num_key_value_heads or config.num_attention_heads
    return heads, config.hidden_size // config.num_attention_heads


class TorchDecoder:
    """The torch backend's Decoder: a static KV cache, and CFG as batch 2 once the image starts,
    so the weights are read once per step.

    The unconditional row shares the cache's positions with the conditional one but masks
    out the prompt positions, so it sees only the image block, at positions from 0.
    """

    def __init__(self, lm, device: str = "cpu"):
        self.step_fn = ChameleonStep(lm).eval()
        self.device = torch.device(device)
        self.dtype = lm.dtype
        self.layers = lm.config.num_hidden_layers
        self.heads, self.head_dim = kv_shape(lm.config)

    @torch.inference_mode()
    def _run(self, ids: np.ndarray) -> np.ndarray:
        b, t, p = self.batch, len(ids), self.cache.length
        if p + t > self.mask.shape[1]:
            raise GenerationError(f"KV cache capacity {self.mask.shape[1]} exceeded")
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device).unsqueeze(0).expand(b, t)
        positions = self.next_pos[:b].unsqueeze(1) + torch.arange(t, device=self.device)
        self.mask[:b, p:p + t] = 1
        logits = self.step_fn.run(input_ids, self.mask[:b, :p + t], positions, self.cache)
        self.cache.length += t
        self.next_pos[:b] += t
        return logits.cpu().numpy()

    def prefill(self, ids: np.ndarray, capacity: int) -> np.ndarray:
        capacity = max(capacity, len(ids))
        self.cache = StaticKV(self.layers, self.heads, capacity, self.head_dim, self.dtype, self.device)
        self.mask = torch.zeros(2, capacity, dtype=torch.int64, device=self.device)
        self.next_pos = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.batch = 1
        return self._run(ids)

    def begin_unconditional(self) -> None:
        self.batch = 2  # row 1: no past (mask 0 over the prompt), positions from 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids)
