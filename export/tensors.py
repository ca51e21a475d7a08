"""The tensors of a checkpoint, read a few rows at a time in their own dtype.

``SafetensorsTensors`` indexes every tensor of the shards from their headers alone, then reads the
rows asked for with plain file reads into a buffer of that size. (safetensors' own reader returns
tensors backed by a memory map of the shard, and every page read through a map stays in the
process's resident set until the map goes, so streaming a 14 GB checkpoint through it shows up as
14 GB of RSS.) ``LoadedTensors`` serves a state dict of torch tensors: the VQ pickle, which is small
(memory-mapped by the exporter, so only the tensors read cost memory).

The safetensors layout: an 8-byte little-endian header length, a JSON header mapping each name to
its dtype, shape and [begin, end) byte offsets, then the data, rows contiguous (C order).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.errors import CheckpointError
from pure_lite.model_files import confined, require_regular
from pure_lite.safetensors_header import read_header


def _torch_dtypes() -> dict:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


class Tensors(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def nbytes(self, name: str) -> int: ...

    def read(self, name: str, start: int | None = None, stop: int | None = None):
        """Rows ``start:stop`` (all without them) as a torch tensor in the stored dtype."""


class SafetensorsTensors:
    """Tensors of one or more safetensors files."""

    def __init__(self, paths: list[Path]):
        dtypes = _torch_dtypes()
        self._entry: dict[str, tuple[Path, tuple[int, ...], object, int]] = {}  # path, shape, dtype, offset
        for path in paths:
            for name, (shape, dtype, offset) in self._read_header(path, dtypes).items():
                if name in self._entry:
                    raise CheckpointError(f"tensor {name!r} is in both {self._entry[name][0].name} and {path.name}")
                self._entry[name] = (path, shape, dtype, offset)

    @staticmethod
    def _read_header(path: Path, dtypes: dict) -> dict:
        """name -> (shape, torch dtype, file offset), from a header checked against the file (read_header)."""
        out = {}
        for name, entry in read_header(path).items():
            if entry.dtype not in dtypes:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry.dtype}, which export does not read")
            out[name] = (entry.shape, dtypes[entry.dtype], entry.offset)
        return out

    @classmethod
    def language_model(cls, files: CheckpointFiles) -> "SafetensorsTensors":
        """The language model's shards: those the index names, or ``model.safetensors`` (checked to be
        regular files inside the folder, pure_lite.model_files)."""
        paths = files.weight_files()
        for path in paths:
            confined(files.root, path)
            require_regular(path)
        return cls(paths)

    def names(self) -> list[str]:
        return list(self._entry)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry[name][1]

    def nbytes(self, name: str) -> int:
        _, shape, dtype, _ = self._entry[name]
        return math.prod(shape) * dtype.itemsize

    def read(self, name: str, start: int | None = None, stop: int | None = None):
        import torch

        path, shape, dtype, offset = self._entry[name]
        rows = shape[0] if shape else 1
        start, stop = (0 if start is None else start), (rows if stop is None else stop)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buffer = bytearray((stop - start) * row_bytes)
        with open(path, "rb") as f:
            f.seek(offset + start * row_bytes)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path} ends inside tensor {name!r}")
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return tensor.reshape((stop - start, *shape[1:]) if shape else ())


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

    def read(self, name: str, start: int | None = None, stop: int | None = None):
        tensor = self._state[name]
        return tensor if start is None and stop is None else tensor[start:stop]
