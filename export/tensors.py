"""The tensors of a checkpoint, read one at a time in their own dtype.

``SafetensorsTensors`` knows every tensor's file, shape and size from the shards' headers alone and
opens a shard only for the one tensor it reads: a safetensors file is memory-mapped while open, and
a mapping kept open for the whole export would leave every page it touched resident, so the process
would grow to the checkpoint's size after all. ``LoadedTensors`` serves a state dict already in
memory (the VQ pickle, which is small and cannot be read piecewise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.errors import CheckpointError

_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
INDEX_FILE = "model.safetensors.index.json"


class Tensors(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def nbytes(self, name: str) -> int: ...

    def read(self, name: str): ...  # a torch.Tensor in the file's dtype


class SafetensorsTensors:
    """Tensors of one or more safetensors files; ``read`` returns a torch tensor in the stored dtype."""

    def __init__(self, paths: list[Path]):
        from safetensors import safe_open

        self._file: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if name in self._file:
                            raise CheckpointError(f"tensor {name!r} is in both {self._file[name].name} and {path.name}")
                        piece = f.get_slice(name)
                        self._file[name] = path
                        self._meta[name] = (tuple(piece.get_shape()), piece.get_dtype())
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"cannot read {path}: {exc}") from exc

    @classmethod
    def language_model(cls, files: CheckpointFiles) -> "SafetensorsTensors":
        """The language model's shards: those the index names, or every non-VQ ``*.safetensors``."""
        index = files.root / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from exc
            paths = [files.root / name for name in names]
            for name, path in zip(names, paths):
                if Path(name).is_absolute() or path.resolve().parent != files.root.resolve() or not path.is_file():
                    raise CheckpointError(f"{index} names a shard that is not a file in {files.root}: {name}")
        else:
            paths = sorted(p for p in files.root.glob("*.safetensors") if not p.name.startswith("vq_"))
        return cls(paths)

    def names(self) -> list[str]:
        return list(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def nbytes(self, name: str) -> int:
        shape, dtype = self._meta[name]
        return math.prod(shape) * _ITEM_BYTES.get(dtype, 4)

    def read(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self._file[name]), framework="pt") as f:
            return f.get_tensor(name)


class LoadedTensors:
    """A state dict already in memory, behind the same interface."""

    def __init__(self, state: dict):
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def nbytes(self, name: str) -> int:
        tensor = self._state[name]
        return tensor.numel() * tensor.element_size()

    def read(self, name: str):
        return self._state[name]
