"""A safetensors file's header, read and checked against the file itself before any library maps it.

The format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data buffer. A header that lies
(a length past the end of the file, offsets that overlap, leave holes or run past the buffer, a shape
whose size disagrees with its byte range) makes the safetensors and transformers loaders fail deep
inside with their own exception types, or map the wrong bytes. Checking it here turns each into one
CheckpointError naming the file and tensor, and gives the loader only files whose every tensor lies
where the header says.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import NamedTuple

from .errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class Entry(NamedTuple):
    dtype: str  # safetensors' name: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # where the tensor's bytes start in the file


def read_header(path: Path) -> dict[str, Entry]:
    """``{tensor name: Entry}`` of a safetensors file whose header checks out against its size.

    Tensors must tile the data buffer exactly (sorted by offset: each starts where the previous one
    ends, the last ends at the end of the file), as the safetensors library itself requires.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > info.st_size:
                raise CheckpointError(f"{path}: its header claims {n} bytes, but the file has {info.st_size} "
                                      "(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: its header's JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its header is not a JSON object")
    return _check_entries(path, header, 8 + n, info.st_size - 8 - n)


def _check_entries(path: Path, header: dict, start: int, buffer_bytes: int) -> dict[str, Entry]:
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: its header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{where}: unsupported dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_natural(d) for d in shape):
            raise CheckpointError(f"{where}: shape {str(shape)[:40]} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise CheckpointError(f"{where}: data_offsets {str(offsets)[:40]} are not [begin, end]")
        if (offsets[1] - offsets[0]) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{where}: shape {shape} of {dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]} "
                                  f"bytes, its data_offsets span {offsets[1] - offsets[0]}")
        tensors[name] = Entry(dtype, tuple(shape), start + offsets[0])
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {end} "
                                  "(overlapping tensors or a hole)")
        end = stop
    if end != buffer_bytes:
        raise CheckpointError(f"{path}: the tensors span {end} bytes of data but the file holds {buffer_bytes} "
                              "(truncated, or bytes the header does not account for)")
    return tensors


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
