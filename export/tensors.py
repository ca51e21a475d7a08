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

import json
import math
import struct
from pathlib import Path
from typing import Protocol

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


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
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > _MAX_HEADER:
                    raise ValueError(f"header of {size} bytes")
                header = json.loads(f.read(size))
            end_of_file = path.stat().st_size
            out = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                shape, dtype = tuple(int(d) for d in info["shape"]), dtypes[info["dtype"]]
                begin, end = (8 + size + int(o) for o in info["data_offsets"])
                if end - begin != math.prod(shape) * dtype.itemsize or end > end_of_file:
                    raise ValueError(f"{name}: data offsets do not fit its shape {shape} and dtype {info['dtype']}")
                out[name] = (shape, dtype, begin)
            return out
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc

    @classmethod
    def language_model(cls, files: CheckpointFiles) -> "SafetensorsTensors":
        """The language model's shards: those the index names, or every non-VQ ``*.safetensors``."""
        index = files.root / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from exc
            root = files.root.resolve()
            paths = [files.root / name for name in names]
            for name, path in zip(names, paths):
                if Path(name).is_absolute() or path.resolve().parent != root or not path.is_file():
                    raise CheckpointError(f"{index} names a shard that is not a file in {files.root}: {name}")
        else:
            paths = sorted(p for p in files.root.glob("*.safetensors") if not p.name.startswith("vq_"))
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
