"""The Chameleon language model in torch: loading, and one decoder call with explicit KV tensors.

``ChameleonStep`` defines the graph contract the ONNX export traces and the runtime serves:

    (input_ids, attention_mask, position_ids, past keys/values) -> (hidden states, new keys/values)

followed by one of two heads: ``lm_head`` (all logits, for text) or ``ImageHead`` (the
image tokens' rows of ``lm_head`` only, for image steps, where every other id is masked anyway).

where the past is the runtime's whole preallocated cache (B, heads, S, head_dim) and
attention_mask (B, S + T) marks which of its S slots hold real positions, then the T new
tokens. Attention scores the past and the new tokens separately and joins only the small
score matrices, so no step ever copies the cache; the caller writes the returned new keys
and values into its buffer. The torch backend runs the same weights over a static cache of
its own (``pure_lite.torch_backend.decoder``, with the layer forward of ``pure_lite.torch_backend.layers``, fewer kernels
per step). Both call the decoder layers and ``lm_head`` directly because the
stock ``ChameleonForConditionalGeneration.forward`` masks every image token out of the logits.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointFiles
from ..errors import CheckpointError, MissingDependencyError
from ..tokens import read_tokenizer_vocab

# Keys the checkpoint may lack: transformers builds Chameleon's own VQ-VAE inside the
# model, which PURE never uses (it has the LlamaGen VQ-8 instead).
UNUSED_WEIGHT_PREFIXES = ("model.vqmodel.",)


def chameleon_config(files: CheckpointFiles):
    """The checkpoint's ``ChameleonConfig``, with the vocabulary map transformers needs."""
    from transformers import ChameleonConfig

    config = ChameleonConfig.from_pretrained(files.root)
    if config.vocabulary_map is None:
        # Released PURE configs may omit it; transformers needs it, the tokenizer has it.
        config.vocabulary_map = read_tokenizer_vocab(files.tokenizer)
    return config


def load_language_model(files: CheckpointFiles, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa", quantization_config=None):
    """Load the Chameleon checkpoint strictly: every used weight must be present with its shape."""
    from transformers import ChameleonForConditionalGeneration

    files.check_language_model()  # config values and safetensors headers, before transformers allocates
    config = chameleon_config(files)
    if attn_implementation == SPLIT_ATTENTION:
        register_split_attention()
    kwargs = {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model, info = ChameleonForConditionalGeneration.from_pretrained(
            files.root, config=config, dtype=dtype or torch.float32, attn_implementation=attn_implementation,
            output_loading_info=True, use_safetensors=True, **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the language model from {files.root}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(UNUSED_WEIGHT_PREFIXES)]
    bad = missing + list(info.get("mismatched_keys", []))
    if bad:
        raise CheckpointError(f"{files.root}: language-model weights missing or of the wrong shape: {bad[:8]}")
    if quantization_config is None:
        model = model.to(device)
    return model.eval()


SPLIT_ATTENTION = "pure_lite_split_cache"


def split_cache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          split_cache=None, **kwargs):
    """Attention over (past cache slots, new tokens) without concatenating keys or values.

    query (B, H, T, D); key/value: the new tokens' (B, H, T, D); the layer's past comes from
    ``split_cache``; attention_mask is additive (B, 1, T, S + T).
    """
    past_k = split_cache.past[2 * module.layer_idx]
    past_v = split_cache.past[2 * module.layer_idx + 1]
    slots = past_k.shape[2]
    scores = torch.cat([torch.matmul(query, past_k.transpose(2, 3)), torch.matmul(query, key.transpose(2, 3))], dim=-1)
    probs = torch.softmax(scores * scaling + attention_mask, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., :slots], past_v) + torch.matmul(probs[..., slots:], value)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def register_split_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SPLIT_ATTENTION, split_cache_attention)


class _SplitCache:
    """Duck-typed cache for the decoder layers: hands the past to split_cache_attention, keeps the new keys."""

    def __init__(self, past: tuple[torch.Tensor, ...]):
        self.past = past
        self.present: list[torch.Tensor] = [None] * len(past)  # type: ignore[list-item]

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.present[2 * layer_idx], self.present[2 * layer_idx + 1] = key, value
        return key, value


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low).unsqueeze(1)


def split_additive_mask(attention_mask: torch.Tensor, new_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, S+T) 0/1 mask over (cache slots, new tokens) to (B, 1, T, S+T); causal among the new tokens.

    Every valid slot holds an earlier position, so the past needs no causal part.
    """
    slots = attention_mask.shape[1] - new_tokens
    i = torch.arange(new_tokens, device=attention_mask.device).unsqueeze(1)  # (T, 1)
    j = torch.arange(slots + new_tokens, device=attention_mask.device).unsqueeze(0) - slots  # (1, S+T)
    return _additive((j <= i).unsqueeze(0) & attention_mask.bool().unsqueeze(1), dtype)


@functools.cache
def _cache_keyword(layer_type: type) -> str:
    """The keyword under which ``layer_type.forward`` takes its KV cache in the installed transformers."""
    params = inspect.signature(layer_type.forward).parameters  # follows deprecate_kwarg's functools.wraps
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise MissingDependencyError(
        f"{layer_type.__name__}.forward takes neither cache= nor past_key_values=: this transformers version "
        "is not supported (see pyproject.toml for the tested range)"
    )


class ChameleonStep(nn.Module):
    """One decoder call.

    ``forward(input_ids, attention_mask, position_ids, *past) -> (hidden, *new)`` is the export
    contract (the model must be loaded with ``attn_implementation=SPLIT_ATTENTION``):
    input_ids, position_ids (B, T) int64; attention_mask (B, S+T) int64; past key/value per
    layer (B, heads, S, head_dim); hidden (B, T, hidden): the final-norm state of every new
    position (speculative decoding checks them all); new key/value per layer (B, heads, T, head_dim).
    ``run`` serves any cache object with the layers' ``update`` method and a prepared mask.
    """

    def __init__(self, lm):
        super().__init__()
        self.model = lm.model
        self.lm_head = lm.lm_head

    def run(self, input_ids, mask, position_ids, cache, **layer_kwargs):
        """Final-norm hidden states of the new tokens (B, T, hidden); ``mask`` is additive (B, 1, T, keys).

        The layers take the cache as ``cache=`` in transformers 5.24 and as ``past_key_values=`` in
        5.0 and 5.17; under the wrong name it lands in ``**kwargs`` and is ignored (5.17: a shape
        error, 5.0: silently wrong logits), so the name is read from the installed layer's signature.
        """
        return self.run_embedded(self.model.embed_tokens(input_ids), mask, position_ids, cache, **layer_kwargs)

    def run_embedded(self, hidden, mask, position_ids, cache, **layer_kwargs):
        """``run`` from the input embeddings (B, T, hidden)."""
        rope = self.model.rotary_emb(hidden, position_ids)
        cache_arg = {_cache_keyword(type(self.model.layers[0])): cache}
        for layer in self.model.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=True,
                        position_embeddings=rope, **cache_arg, **layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.model.norm(hidden)
        return hidden

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = _SplitCache(past)
        mask = split_additive_mask(attention_mask, input_ids.shape[1], past[0].dtype)
        return (self.run(input_ids, mask, position_ids, cache, split_cache=cache), *cache.present)


class ImageHead(nn.Module):
    """``lm_head`` restricted to the image tokens, rows in code order: hidden -> (..., codebook) logits."""

    def __init__(self, lm, image_ids: np.ndarray):
        super().__init__()
        rows = torch.as_tensor(np.array(image_ids), device=lm.lm_head.weight.device)
        self.weight = nn.Parameter(lm.lm_head.weight.detach()[rows].clone(), requires_grad=False)

    def forward(self, hidden):
        return torch.matmul(hidden.unsqueeze(-2), self.weight.t()).squeeze(-2).float()  # MatMul for quantizers


class TextHead(nn.Module):
    """The full ``lm_head`` as its own graph: hidden -> (..., V) float32 logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm_head = lm.lm_head

    def forward(self, hidden):
        return self.lm_head(hidden.unsqueeze(-2)).squeeze(-2).float()


def kv_shape(config) -> tuple[int, int]:
    """(heads, head_dim) of the KV cache."""
    heads = config.num_key_value_heads or config.num_attention_heads
    return heads, config.hidden_size // config.num_attention_heads
