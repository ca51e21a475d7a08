"""VQ pickles converted to safetensors in pure-lite's own cache, and the LlamaGen VQ a Hub model falls back to.

PURE's repository on the Hub holds no image tokenizer; PURE uses LlamaGen's ``vq_ds8_c2i.pt``, a torch
pickle. pure-lite reads a pickle only with ``weights_only=True`` and converts it once to safetensors,
named by the pickle's sha256, in its own cache (``$PURE_LITE_CACHE``, else ``$XDG_CACHE_HOME/pure-lite``,
else ``~/.cache/pure-lite``), never in Hugging Face's cache, whose files must not change. A changed
pickle has another sha256 and so is converted again. No torch and no huggingface_hub here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from .hf_cache import snapshot_blobs
from .manifest import sha256_of

CACHE_ENV = "PURE_LITE_CACHE"


@dataclass(frozen=True)
class PinnedFile:
    """One file of a Hub repository at a fixed commit, with the sha256 its bytes must have."""

    repo_id: str
    filename: str
    revision: str
    sha256: str


# LlamaGen's VQ-8 as PURE uses it. The commit and the sha256 are copied from the file's page on the Hub
# (huggingface.co/FoundationVision/LlamaGen/blob/81e41139272c038412e4fe8f1c52a51ebbf95b8b/vq_ds8_c2i.pt,
# "Git LFS Details", 281 MB; the file was last changed by commit dc1fec5 "add c2i models"). Not checked
# against the bytes: no machine of this project can download it. A mismatch stops loading with an error
# naming both hashes (pure_lite.hub), it is never silently accepted.
LLAMAGEN_VQ = PinnedFile(
    repo_id="FoundationVision/LlamaGen",
    filename="vq_ds8_c2i.pt",
    revision="81e41139272c038412e4fe8f1c52a51ebbf95b8b",
    sha256="c70d2966ec012f378793214ff0755087e7c5fe6f035b469995143325dca4a4e3",
)


def cache_dir() -> Path:
    """pure-lite's own cache folder (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pure-lite"


def converted_path(sha256: str) -> Path:
    """Where the safetensors conversion of the VQ pickle with this sha256 is kept."""
    return cache_dir() / "vq" / f"{sha256}.safetensors"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(Path(path))


def file_sha256(path: Path) -> str:
    """The sha256 of a file, computed once per (file, size, modification time) in this process."""
    real = path.resolve()
    stat = real.stat()
    return _sha256(str(real), stat.st_size, stat.st_mtime_ns)


def vq_for_snapshot(pickle: Path) -> Path | None:
    """The converted VQ of a model in Hugging Face's cache whose VQ pickle would be ``pickle``, or None (not
    in a snapshot, or not converted yet).

    A snapshot holding the pickle uses that pickle's conversion; one without uses LlamaGen's pinned file's.
    pure_lite.hub converts when it resolves a model, so after ``pure-lite download`` this finds it.
    """
    if snapshot_blobs(pickle.parent) is None:
        return None
    converted = converted_path(file_sha256(pickle) if pickle.is_file() else LLAMAGEN_VQ.sha256)
    return converted if converted.is_file() else None
