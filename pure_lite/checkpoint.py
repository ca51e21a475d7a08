"""The on-disk layout of a PURE checkpoint (docs/pure-format.md §1) and safe loading of its files.

    MODEL_DIR/
      config.json                      Chameleon config (model_type "chameleon"); a model trained by
                                       pure-lite also records its output side (IMAGE_SIZE_KEY)
      model*.safetensors (+ index)     language-model weights, possibly sharded
      tokenizer.json                   text tokenizer incl. image and special tokens
      vq_ds8_c2i.pt                    image tokenizer: {"model": state_dict}, loaded weights_only
      vq_ds8_c2i.safetensors           optional, written by ``convert_vq``; preferred when present

Nothing in this module imports torch at import time.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path
from .components import PURE_IMAGE_SIZE, PURE_SCALE
from .errors import CheckpointError, MissingDependencyError
from .tokens import GRID_PIXELS

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
VQ_PICKLE_FILE = "vq_ds8_c2i.pt"
VQ_SAFETENSORS_FILE = "vq_ds8_c2i.safetensors"
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
        """Find every file of a checkpoint folder, or say which ones are missing."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model folder {root} does not exist or is not a folder")
        missing = [name for name in (CONFIG_FILE, TOKENIZER_FILE) if not (root / name).is_file()]
        if not any(root.glob("*.safetensors")) or not [p for p in root.glob("*.safetensors") if not p.name.startswith("vq_")]:
            missing.append("model*.safetensors")
        vq = root / VQ_SAFETENSORS_FILE
        if not vq.is_file():
            vq = root / VQ_PICKLE_FILE
            if not vq.is_file():
                missing.append(VQ_PICKLE_FILE)
        if missing:
            raise CheckpointError(f"{root} is not a PURE checkpoint: missing {', '.join(missing)}")
        return cls(root=root, config=root / CONFIG_FILE, tokenizer=root / TOKENIZER_FILE, vq=vq)

    def read_config(self) -> dict:
        try:
            config = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {self.config}: {exc}") from exc
        if config.get("model_type") != "chameleon":
            raise CheckpointError(f"{self.config}: model_type is {config.get('model_type')!r}, expected 'chameleon'")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if not isinstance(config.get(key), int):
                raise CheckpointError(f"{self.config}: missing or non-integer {key!r}")
        size = config.get(IMAGE_SIZE_KEY, PURE_IMAGE_SIZE)
        if not isinstance(size, int) or size <= 0 or size % GRID_PIXELS:
            raise CheckpointError(f"{self.config}: {IMAGE_SIZE_KEY} must be a positive multiple of {GRID_PIXELS}, "
                                  f"got {size!r}")
        scale = config.get(SCALE_KEY, PURE_SCALE)
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
            raise CheckpointError(f"{self.config}: {SCALE_KEY} must be a positive integer, got {scale!r}")
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

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
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
