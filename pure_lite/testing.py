"""Tiny, deterministic PURE checkpoints in the released on-disk layout, for tests and examples.

``layout="pure"`` reproduces the released vocabulary (73728 ids; image tokens at
4..8195 and 65536..73727; the special ids of docs/pure-format.md §2). ``layout="compact"`` puts the
same names at different, small ids, which proves nothing depends on hard-coded ids.
Weights are random (seeded); only shapes, names and formats are real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from .checkpoint import CONFIG_FILE, TOKENIZER_FILE, VQ_PICKLE_FILE
from .tokens import (
    BOS,
    END_OF_TURN,
    IMAGE_END,
    IMAGE_START,
    MAX_GRID,
    ROW_END,
    grid_token_name,
    image_token_name,
)

_BASIC = ["<s>", "<pad>", "</s>", "<unk>"]


def _pure_vocab() -> dict[str, int]:
    """The released id layout: names at their docs/pure-format.md §2 ids, the rest filled with reserved/text tokens."""
    from tokenizers import pre_tokenizers

    vocab = {name: i for i, name in enumerate(_BASIC)}
    vocab.update({image_token_name(c): 4 + c for c in range(8192)})
    vocab[IMAGE_END] = 8196
    vocab[IMAGE_START] = 8197
    # <reservedNNNNN> sits at id NNNNN + 4 (row end 8803, end of turn 8710, grids 8804 + n).
    for tid in range(8198, 8804 + MAX_GRID + 1):
        vocab[f"<reserved{tid - 4:05d}>"] = tid
    next_id = 8804 + MAX_GRID + 1
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = next_id
        next_id += 1
    for tid in range(next_id, 65536):
        vocab[f"<filler{tid}>"] = tid
    vocab.update({image_token_name(8192 + c): 65536 + c for c in range(8192)})
    return vocab


def _compact_vocab(codebook_size: int) -> dict[str, int]:
    from tokenizers import pre_tokenizers

    names = list(_BASIC) + sorted(pre_tokenizers.ByteLevel.alphabet())
    names += [ROW_END, IMAGE_START, END_OF_TURN, IMAGE_END]
    names += [grid_token_name(n) for n in range(1, 17)]
    names += [image_token_name(c) for c in range(codebook_size)]
    return {name: i for i, name in enumerate(names)}


def _write_tokenizer(vocab: dict[str, int], path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [n for n in vocab if n.startswith("<") and n.endswith(">") and not n.startswith("<filler")]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    tok.save(str(path))


def make_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    layout: Literal["pure", "compact"] = "pure",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 4096,
    vq_base_channels: int = 32,
    compact_codebook: int = 256,
    init_std: float = 0.2,
    dtype: Literal["float32", "bfloat16"] = "float32",
    max_shard_size: str = "10MB",
) -> Path:
    """Write config.json, sharded safetensors, tokenizer.json and vq_ds8_c2i.pt into ``path``.

    ``init_std`` is larger than a real model's so random logits are peaked enough to give
    varied, deterministic greedy outputs. ``dtype`` is the language model's dtype on disk (the
    released PURE weights are bfloat16).
    """
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from .torch_backend.vq import VQConfig, VQModel

    if layout not in ("pure", "compact"):
        raise ValueError(f"layout must be 'pure' or 'compact', got {layout!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _pure_vocab() if layout == "pure" else _compact_vocab(compact_codebook)
    vocab_size = 73728 if layout == "pure" else len(vocab)
    codebook = 16384 if layout == "pure" else compact_codebook
    _write_tokenizer(vocab, out / TOKENIZER_FILE)

    torch.manual_seed(seed)
    config = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        vocabulary_map=vocab,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "base_channels": 32,
                   "channel_multiplier": [1], "num_res_blocks": 1, "resolution": 32, "attn_resolutions": []},
    )
    model = ChameleonForConditionalGeneration(config)
    with torch.no_grad():  # random per-head qk-norm gains make attention patterns differ between heads
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(out, max_shard_size=max_shard_size)
    # transformers' own VQ-VAE inside Chameleon is unused by PURE and absent from released weights.
    (out / "generation_config.json").unlink(missing_ok=True)

    vq = VQModel(VQConfig(base_channels=vq_base_channels, z_channels=32, codebook_size=codebook))
    torch.save({"model": vq.state_dict()}, out / VQ_PICKLE_FILE)
    meta = {"layout": layout, "seed": seed, "note": "random weights, for tests only"}
    (out / "tiny_checkpoint.json").write_text(json.dumps(meta, indent=2))
    assert (out / CONFIG_FILE).is_file()
    return out


def write_hub_cache(
    cache: str | os.PathLike,
    repo_id: str,
    folder: str | os.PathLike,
    *,
    revision: str = "main",
    commit: str | None = None,
    files: list[str] | None = None,
) -> Path:
    """Put the files of ``folder`` into a Hugging Face hub cache as ``repo_id`` at ``revision``; returns
    the snapshot folder.

    The layout is the one huggingface_hub writes and reads offline (pure_lite.hf_cache): each file's bytes
    in ``models--ORG--NAME/blobs/<sha256>``, ``refs/<revision>`` holding the commit, and
    ``snapshots/<commit>/<name>`` a relative symbolic link to its blob. ``commit`` defaults to a hash of the
    files' names and contents; ``files`` (names relative to ``folder``) defaults to every file in it.
    """
    import hashlib
    import shutil

    from .hf_cache import repo_folder_name

    src = Path(folder)
    names = sorted(files if files is not None else
                   (p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()))
    digests = {name: hashlib.sha256((src / name).read_bytes()).hexdigest() for name in names}
    if commit is None:
        commit = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    repo = Path(cache) / repo_folder_name(repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, digest in digests.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src / name, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if revision != commit:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return snapshot


def write_released_vq_shapes(folder: str | os.PathLike) -> Path:
    """Write ``vq_ds8_c2i.safetensors`` with the released VQ-8's tensor names and shapes but no data (a sparse
    file of zeros): what the memory plan reads of a codec, for plans of the real model's shape in tests and
    benchmarks without its 280 MB of weights on disk."""
    import torch

    from .checkpoint import VQ_SAFETENSORS_FILE
    from .torch_backend.vq import VQConfig, VQModel

    with torch.device("meta"):
        state = VQModel(VQConfig()).state_dict()
    header, offset = {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = Path(folder) / VQ_SAFETENSORS_FILE
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return path
