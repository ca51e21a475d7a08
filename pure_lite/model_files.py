"""Reading a model folder's own files defensively: which paths a folder may use, and bounded reads.

A model folder (a checkpoint or an export) is input like any photo, so:

- **Confinement.** A file a model folder names must lie inside the folder after resolving
  symbolic links. The one exception is a Hugging Face cache snapshot
  (``.../models--org--name/snapshots/<revision>/``), whose files are links into that repository's
  own ``blobs/`` folder: there the blobs folder counts as inside too (and nothing else of the
  cache does). Decided from the file system's metadata only (``resolve``): nothing is opened.
- **Regular files only.** A FIFO or a device would block or never end; every model file is
  opened non-blocking and checked to be a regular file before a byte is read.
- **Bounded sizes.** JSON files (manifest, config, tokenizer, shard index) are read only up to a
  limit generous for real files (the released PURE's tokenizer.json is a few MB), and a JSON
  nesting too deep for the parser is an error, not a RecursionError.

The ``error`` argument is the typed error to raise (CheckpointError or ManifestError): every
message names the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import CheckpointError
from .hf_cache import snapshot_blobs
from .regular_files import NotRegularFileError, open_regular, regular_file_problem

MAX_CONFIG_BYTES = 4 << 20  # config.json, generation_config.json: a few KB in practice
MAX_MANIFEST_BYTES = 16 << 20  # pure_lite_manifest.json: a few KB
MAX_INDEX_BYTES = 64 << 20  # model.safetensors.index.json: ~100 KB for a 7B model
MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json: ~2-10 MB for real vocabularies


def allowed_roots(root: Path) -> tuple[Path, ...]:
    """The folders a model folder's files may resolve into: the folder itself, and for a Hugging Face
    cache snapshot (``models--*/snapshots/<revision>``) that repository's ``blobs`` folder (pure_lite.hf_cache)."""
    blobs = snapshot_blobs(root)
    return (root.resolve(),) if blobs is None else (root.resolve(), blobs)


def confined(root: Path, path: Path, error: type[CheckpointError] = CheckpointError) -> Path:
    """``path`` (a file inside ``root`` by name) if it resolves inside ``allowed_roots(root)``;
    otherwise ``error`` naming the link's target. Nothing is opened."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise error(f"{path}: cannot resolve it: {exc}") from None
    if any(target == r or r in target.parents for r in allowed_roots(root)):
        return path
    raise error(f"{path}: refused: it resolves to {target}, outside the folder {root} (a symbolic link?); "
                "a model folder's files must lie inside it (or, in a Hugging Face cache, in its repository's blobs)")


def check_folder_entries(root: Path, error: type[CheckpointError] = CheckpointError) -> None:
    """Every entry of ``root`` (not recursive) resolves inside the folder: libraries that read a folder
    by name (transformers' ``from_pretrained``) then cannot be led outside it by a link."""
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        raise error(f"cannot list {root}: {exc}") from exc
    for entry in entries:
        confined(root, entry, error)


def read_bytes(path: Path, limit: int, error: type[CheckpointError] = CheckpointError) -> bytes:
    """The contents of ``path``, a regular file of at most ``limit`` bytes; ``error`` otherwise.

    Opened by ``regular_files.open_regular`` (a FIFO cannot block the open; the type is the open
    descriptor's), and the size is the descriptor's too, so what is checked is what is read.
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise error(f"{path} is {size} bytes, more than the {limit >> 20} MB a file of its kind may be")
            data = f.read(limit + 1)
    except NotRegularFileError as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:  # grew since fstat
        raise error(f"{path} is more than the {limit >> 20} MB a file of its kind may be")
    return data


def read_json(path: Path, limit: int, error: type[CheckpointError] = CheckpointError):
    """``path`` parsed as JSON (``read_bytes`` rules); malformed, non-UTF-8 or too deeply nested JSON
    is ``error``."""
    data = read_bytes(path, limit, error)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None


def require_regular(path: Path, error: type[CheckpointError] = CheckpointError) -> os.stat_result:
    """``path``'s stat (following links) if it is a regular file: checked before a library opens it by name."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise error(f"{path}: {problem}")
    return path.stat()
