"""Typed errors: every failure a user can cause has its own class, all under PureLiteError."""

from __future__ import annotations


class PureLiteError(Exception):
    """Base class of every error pure-lite raises on purpose."""


class InvalidImageError(PureLiteError, ValueError):
    """An input image that cannot be read or converted (corrupt, truncated, empty, unsupported, too large)."""


class TokenFormatError(PureLiteError, ValueError):
    """A token stream that breaks PURE's image-block grammar.

    ``position`` is the index in the examined sequence where the problem was found.
    """

    def __init__(self, message: str, position: int | None = None):
        self.position = position
        where = f" (at token {position})" if position is not None else ""
        super().__init__(f"{message}{where}")


class OutputError(PureLiteError, OSError):
    """An output that cannot be written (no permission, the parent is a file) or that exists already."""


class CheckpointError(PureLiteError, ValueError):
    """A model folder that is missing files, has wrong tensors, or refuses safe loading."""


class HubError(CheckpointError):
    """A model named by its Hugging Face Hub id that cannot be fetched: offline and not cached, no such
    repository or revision, gated or private without a token, or a network failure."""


class ManifestError(CheckpointError):
    """An exported folder whose manifest or files do not check out."""


class GenerationError(PureLiteError, RuntimeError):
    """Decoding could not produce a well-formed image block (budget exhausted, no image start, cancelled)."""


class MissingDependencyError(PureLiteError, ImportError):
    """An optional dependency (torch, onnxruntime, tensorrt, bitsandbytes) is needed but not installed."""


class GenerationCancelled(GenerationError):
    """The caller's ``cancel`` callback asked decoding to stop; no partial image is returned."""
