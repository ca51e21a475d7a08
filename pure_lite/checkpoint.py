"""The on-disk layout of a PURE checkpoint (docs/pure-format.md §1) and safe loading of its files.

    MODEL_DIR/
      config.json                      Chameleon config (model_type "chameleon"); a model trained by
                                       pure-lite also records its output side (IMAGE_SIZE_KEY)
      model.safetensors, or shards +   language-model weights (safetensors only: no pickle is read)
        model.safetensors.index.json
      tokenizer.json                   text tokenizer incl. image and special tokens
      vq_ds8_c2i.pt                    image tokenizer: {"model": state_dict}, loaded weights_only
      vq_ds8_c2i.safetensors           optional, written by ``convert_vq``; preferred when present

Nothing in this module imports torch at import time.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path
from .components import PURE_IMAGE_SIZE, PURE_SCALE
from .errors import CheckpointError, MissingDependencyError
from .model_dims import check_heads, check_image_size, check_int, check_scale
from .model_files import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, check_folder_entries, confined, read_json, require_regular
from .safetensors_header import read_header
from .vq_cache import vq_for_snapshot

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
VQ_PICKLE_FILE = "vq_ds8_c2i.pt"
VQ_SAFETENSORS_FILE = "vq_ds8_c2i.safetensors"
WEIGHTS_FILE = "model.safetensors"  # transformers' names, the only ones it reads with use_safetensors=True
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# The output side the model was trained for, in config.json beside Chameleon's own keys (transformers keeps
# an unknown key through loading and saving, so a fine-tuned copy inherits it). The released PURE has none.
IMAGE_SIZE_KEY = "pure_lite_image_size"
# The LQ -> HQ factor of the model's training pairs, beside it (absent: PURE's x4, components.PURE_SCALE).
SCALE_KEY = "pure_lite_scale"


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    config: Path
    tokenizer: Path
    vq: Path

    @classmethod
    def locate(cls, path: str | os.PathLike) -> "CheckpointFiles":
        """Find every file of a checkpoint folder, or say which ones are missing.

        Every entry of the folder must resolve inside it (or, for a Hugging Face cache snapshot, inside
        its repository's blobs; pure_lite.model_files), so that no library reading the folder by name
        is led out of it. The language model must be safetensors (``model.safetensors``, or shards
        with ``model.safetensors.index.json``): a folder with only a pickle is refused.
        """
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model folder {root} does not exist or is not a folder")
        check_folder_entries(root)
        for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, VQ_SAFETENSORS_FILE, VQ_PICKLE_FILE):
            if (root / name).exists():
                require_regular(root / name)  # a FIFO or a folder under a model file's name
        missing = [name for name in (CONFIG_FILE, TOKENIZER_FILE) if not (root / name).is_file()]
        if not (root / WEIGHTS_FILE).is_file() and not (root / WEIGHTS_INDEX_FILE).is_file():
            missing.append(f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE} and its shards)")
        vq = root / VQ_SAFETENSORS_FILE
        if not vq.is_file():
            vq = vq_for_snapshot(root / VQ_PICKLE_FILE) or root / VQ_PICKLE_FILE  # from the Hub: converted VQ
            if not vq.is_file():
                missing.append(VQ_PICKLE_FILE)
        if missing:
            raise CheckpointError(f"{root} is not a PURE checkpoint: missing {', '.join(missing)}")
        return cls(root=root, config=root / CONFIG_FILE, tokenizer=root / TOKENIZER_FILE, vq=vq)

    def read_config(self) -> dict:
        """config.json, its sizes checked to be plausible (pure_lite.model_dims) before anything is allocated."""
        config = read_json(self.config, MAX_CONFIG_BYTES)
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.config}: must be a JSON object, got {type(config).__name__}")
        if config.get("model_type") != "chameleon":
            raise CheckpointError(f"{self.config}: model_type is {str(config.get('model_type'))[:40]!r}, "
                                  "expected 'chameleon'")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"):
            check_int(str(self.config), key, config.get(key))
        heads = config["num_attention_heads"]
        if config.get("num_key_value_heads") is not None:
            check_int(str(self.config), "num_key_value_heads", config["num_key_value_heads"])
            check_heads(str(self.config), heads, config["num_key_value_heads"])
        if config["hidden_size"] % heads:
            raise CheckpointError(f"{self.config}: hidden_size {config['hidden_size']} is not a multiple of "
                                  f"num_attention_heads {heads}")
        check_int(str(self.config), "head_dim", config["hidden_size"] // heads)
        size = config.get(IMAGE_SIZE_KEY, PURE_IMAGE_SIZE)
        check_image_size(str(self.config), IMAGE_SIZE_KEY, size)
        check_scale(str(self.config), SCALE_KEY, config.get(SCALE_KEY, PURE_SCALE))
        return config

    def weight_files(self) -> list[Path]:
        """The language model's safetensors files: ``model.safetensors``, or the shards its index names."""
        index = self.root / WEIGHTS_INDEX_FILE
        if not index.is_file():
            return [self.root / WEIGHTS_FILE]
        data = read_json(index, MAX_INDEX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must be an object naming each tensor's shard")
        shards = []
        for name in weight_map.values():
            if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name \
                    or name in (".", ".."):
                raise CheckpointError(f"{index}: weight_map names {str(name)[:60]!r}, not a .safetensors file "
                                      "of this folder")
            if name not in shards:
                shards.append(name)
        return [self.root / name for name in shards]

    def check_language_model(self) -> dict:
        """The config, checked against the language model's safetensors headers (pure_lite.safetensors_header)
        before transformers reads either: the embedding is (vocab_size, hidden_size), the layers are
        exactly num_hidden_layers, the attention projections match the heads. Returns the config."""
        config = self.read_config()
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in self.weight_files():
            confined(self.root, shard)
            require_regular(shard)
            shapes.update({name: entry.shape for name, entry in read_header(shard).items()})
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        heads = config["num_attention_heads"]
        head_dim, kv = hidden // heads, config.get("num_key_value_heads") or heads
        expected = {"model.embed_tokens.weight": ("vocab_size", (vocab, hidden)),
                    "model.layers.0.self_attn.q_proj.weight": ("num_attention_heads", (heads * head_dim, hidden)),
                    "model.layers.0.self_attn.k_proj.weight": ("num_key_value_heads", (kv * head_dim, hidden))}
        for name, (key, shape) in expected.items():
            if name in shapes and shapes[name] != shape:
                raise CheckpointError(f"{self.config}: {key} and hidden_size say {name} is {list(shape)}, "
                                      f"the weights hold {list(shapes[name])}")
        layers = {int(name.split(".")[2]) for name in shapes
                  if name.startswith("model.layers.") and name.split(".")[2].isdigit()}
        if layers != set(range(config["num_hidden_layers"])):
            raise CheckpointError(f"{self.config}: num_hidden_layers is {config['num_hidden_layers']}, the weights "
                                  f"hold {len(layers)} layers")
        return config


def trained_scale(config: dict) -> int:
    """The factor a checkpoint's model was trained for (``read_config`` checked it): restore warns below it."""
    return config.get(SCALE_KEY, PURE_SCALE)


def trained_image_size(config: dict) -> int:
    """The output side a checkpoint's model was trained for (``read_config`` checked it): restore's default."""
    return config.get(IMAGE_SIZE_KEY, PURE_IMAGE_SIZE)


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("this needs torch: pip install 'pure-lite[torch]'") from exc
    return torch


def load_vq_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict:
    """Tensors of a VQ checkpoint (.pt with weights_only=True, or .safetensors).

    ``mmap``: map a (zip-format) .pt instead of reading it, so a tensor costs memory once it is read.
    """
    torch = _torch()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_header(path)  # a lying header is one CheckpointError, not the library's own exception
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if path.exists():
        require_regular(path)  # a FIFO would block torch.load
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist") from exc
    except Exception as exc:  # UnpicklingError for unsafe pickles, RuntimeError for corrupt zips
        raise CheckpointError(
            f"{path} could not be loaded safely (weights_only=True refuses pickled code and odd objects): {exc}"
        ) from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (expected {{'model': {{name: tensor}}}})")
    return state


def convert_vq(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """One-time conversion of ``vq_ds8_c2i.pt`` to safetensors beside it (or at ``dst``)."""
    from safetensors.torch import save_file

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(VQ_SAFETENSORS_FILE)
    state = {k: v.contiguous() for k, v in load_vq_state_dict(src).items()}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp))
    return dst
