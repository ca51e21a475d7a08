"""The on-disk layout of Hugging Face's hub cache, as far as pure-lite reads it (no huggingface_hub import).

    HF_HUB_CACHE/models--ORG--NAME/
      blobs/<hash>                 each file's bytes, once (the hash is the file's ETag)
      refs/<branch or tag>         the commit a revision pointed to when it was fetched
      snapshots/<commit>/<file>    symbolic links into ../../blobs (relative)

A model resolved from the Hub is loaded from its snapshot folder, whose files are links out of that
folder. The checks that refuse links leading out of a model folder accept exactly these: a link in a
snapshot whose target is a file directly in the same repository's ``blobs``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_PREFIX = "models--"


def repo_folder_name(repo_id: str) -> str:
    """``org/name`` -> ``models--org--name``, the repository's folder in the cache."""
    return REPO_PREFIX + repo_id.replace("/", "--")


def snapshot_blobs(folder: str | os.PathLike) -> Path | None:
    """The resolved ``blobs`` folder of the repository when ``folder`` is a snapshot folder of the
    cache (``.../models--ORG--NAME/snapshots/<commit>``), else None."""
    folder = Path(folder)
    snapshots = folder.parent
    repo = snapshots.parent
    if snapshots.name != "snapshots" or not repo.name.startswith(REPO_PREFIX):
        return None
    blobs = repo / "blobs"
    if not blobs.is_dir() or blobs.is_symlink():
        return None
    return blobs.resolve()


def is_snapshot_blob(folder: str | os.PathLike, target: Path) -> bool:
    """Whether the resolved ``target`` is a file directly in the blobs of the snapshot ``folder``."""
    blobs = snapshot_blobs(folder)
    return blobs is not None and target.parent == blobs
