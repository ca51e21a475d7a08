"""Models named by a Hugging Face Hub id (``org/name`` or ``org/name@revision``), fetched with huggingface_hub.

Every place that takes a model (``Restorer.from_pretrained``, ``--model``, ``export``) passes it through
``resolve_model``: an existing path stays a path; an id becomes the snapshot folder of that repository in
Hugging Face's own cache (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` or a login, its
progress bars: the library's, untouched). Only the files the layout needs are fetched:

- an export (the repository holds ``pure_lite_manifest.json``): the manifest and the files it lists,
  checked by the runtime exactly as a local folder;
- a checkpoint: ``config.json``, ``tokenizer.json``, the safetensors shards its index names (or
  ``model.safetensors``), and the VQ when the repository has one; otherwise LlamaGen's VQ at the
  commit and sha256 pinned in pure_lite.vq_cache. Either pickle is converted once to safetensors in
  pure-lite's own cache.

huggingface_hub writes each file under a temporary name and renames it when complete, so a file present
in a snapshot is whole; a snapshot missing files (an interrupted download) is refused, naming them.
Importing this module imports neither huggingface_hub nor torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .checkpoint import CONFIG_FILE, TOKENIZER_FILE, VQ_PICKLE_FILE, VQ_SAFETENSORS_FILE, convert_vq
from .errors import CheckpointError, HubError, MissingDependencyError
from .manifest import MANIFEST_FILE
from . import vq_cache

INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"({_NAME}/{_NAME})(?:@([A-Za-z0-9][A-Za-z0-9._/-]*))?")
_GLOB = re.compile(r"[*?\[\]]")


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``model`` has the form of a Hub id, else None."""
    match = _HUB_ID.fullmatch(model)
    if match is None or "--" in match.group(1) or ".." in match.group(1):
        return None
    return match.group(1), match.group(2)


def is_hub_id(model) -> bool:
    """Whether ``model`` is resolved on the Hub: a string of the form ``org/name[@revision]`` that is not
    an existing path."""
    return isinstance(model, str) and not os.path.exists(model) and parse_hub_id(model) is not None


def resolve_model(model: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of ``model``: a path as given, or a Hub id's snapshot folder (fetched when needed)."""
    if not is_hub_id(model):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hugging Face Hub id, and {model} is a path")
        return Path(model)
    repo_id, at = parse_hub_id(model)
    if at is not None and revision is not None and at != revision:
        raise ValueError(f"{model} names revision {at!r} and revision={revision!r} another; give one")
    return _Fetch(repo_id, revision or at).model()


def download(model: str, revision: str | None = None) -> dict:
    """Fetch everything an offline run of ``model`` needs; returns where it lives and its size in bytes."""
    if not is_hub_id(model):
        raise HubError(f"{model} is not a Hugging Face Hub id (org/name or org/name@revision) "
                       "or is an existing path, which needs no download")
    folder = resolve_model(model, revision)
    if (folder / MANIFEST_FILE).is_file():
        from .manifest import Manifest

        Manifest.load(folder)  # every listed file present and matching its sha256
        vq = None
    else:
        from .checkpoint import CheckpointFiles

        vq = CheckpointFiles.locate(folder).vq
    files = [p for p in folder.rglob("*") if p.is_file()] + ([vq] if vq is not None and vq.parent != folder else [])
    return {"folder": folder, "vq": vq, "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # submodules the package loads lazily
    except ImportError as exc:
        raise MissingDependencyError("a model named by its Hugging Face Hub id is fetched with huggingface_hub: "
                                     "pip install huggingface_hub (it comes with pure-lite's [torch], [runtime], "
                                     "[gpu] and [export] extras)") from exc
    return huggingface_hub


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a transport failure (connection, timeout, interrupted read) rather than an answer."""
    return (isinstance(exc, (OSError, TimeoutError))
            or type(exc).__module__.split(".")[0].rstrip("0123456789") in ("httpx", "httpcore", "requests", "urllib3"))


class _Fetch:
    """One repository at one revision: fetch the files a layout needs, translating the library's errors."""

    def __init__(self, repo_id: str, revision: str | None):
        self.hf = _hub()
        self.repo_id, self.revision = repo_id, revision
        self.spec = repo_id + (f"@{revision}" if revision else "")

    def model(self) -> Path:
        folder = self.fetch([MANIFEST_FILE, CONFIG_FILE, INDEX_FILE])
        commit = folder.name  # the rest comes from the same commit, even if the branch moves meanwhile
        if (folder / MANIFEST_FILE).is_file():
            names = self.manifest_files(folder)
            return self.require(self.fetch([MANIFEST_FILE, *names], revision=commit), names)
        if not (folder / CONFIG_FILE).is_file():
            self.not_in_layout(f"{CONFIG_FILE} (a PURE checkpoint) or {MANIFEST_FILE} (a pure-lite export)")
        weights = self.shards(folder) if (folder / INDEX_FILE).is_file() else [SINGLE_WEIGHTS_FILE]
        needed = [CONFIG_FILE, TOKENIZER_FILE, *weights]
        folder = self.require(self.fetch([*needed, INDEX_FILE, VQ_SAFETENSORS_FILE, VQ_PICKLE_FILE], revision=commit),
                              needed)
        if not (folder / VQ_SAFETENSORS_FILE).is_file():
            self.convert_vq(folder)
        return folder

    def fetch(self, names: list[str], repo_id: str | None = None, revision: str | None = None) -> Path:
        """``snapshot_download`` of exactly ``names`` (those the repository has): the snapshot folder."""
        repo_id = repo_id or self.repo_id
        revision = revision or self.revision
        errors = self.hf.errors
        spec = self.spec if repo_id == self.repo_id else f"{repo_id}@{revision}"
        try:
            return Path(self.hf.snapshot_download(repo_id, revision=revision, allow_patterns=names))
        except errors.GatedRepoError as exc:
            raise HubError(f"{spec} is a gated repository: accept its conditions on huggingface.co/{repo_id} "
                           "and set HF_TOKEN (or run `hf auth login`)") from exc
        except errors.RepositoryNotFoundError as exc:
            raise HubError(f"{spec}: no such repository on the Hugging Face Hub, or it is private and no token "
                           "with access to it is set (HF_TOKEN or `hf auth login`)") from exc
        except errors.RevisionNotFoundError as exc:
            raise HubError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit) on the Hugging Face "
                           "Hub") from exc  # only the first fetch names a revision the user gave
        except getattr(errors, "IncompleteSnapshotError", ()) as exc:  # huggingface_hub >= 1.? keeps a file list
            raise HubError(f"{spec} is only partly in the Hugging Face cache and the Hub cannot be reached: run "
                           f"`pure-lite download {self.spec}` on a connected machine") from exc
        except errors.LocalEntryNotFoundError as exc:
            if self.offline():
                raise HubError(self.offline_message(spec)) from exc
            raise HubError(f"cannot reach the Hugging Face Hub to fetch {spec}, and it is not in the cache "
                           f"({self.hf.constants.HF_HUB_CACHE}): {_one_line(exc)}") from exc
        except errors.HfHubHTTPError as exc:
            raise HubError(f"the Hugging Face Hub refused {spec}: {_one_line(exc)}") from exc
        except Exception as exc:
            if _network_error(exc):
                raise HubError(f"fetching {spec} from the Hugging Face Hub failed ({_one_line(exc)}); run the "
                               "same command again to resume the download") from exc
            raise

    def offline(self) -> bool:
        """Whether downloads are off (HF_HUB_OFFLINE), as huggingface_hub sees it now."""
        return bool(self.hf.constants.HF_HUB_OFFLINE)

    def offline_message(self, spec: str) -> str:
        return (f"{spec} is not in the Hugging Face cache ({self.hf.constants.HF_HUB_CACHE}) and downloads are off "
                f"(HF_HUB_OFFLINE): run `pure-lite download {self.spec}` on a connected machine with the same "
                "HF_HOME / HF_HUB_CACHE")

    def require(self, folder: Path, names: list[str]) -> Path:
        missing = [name for name in names if not (folder / name).is_file()]
        if missing and self.offline():
            raise HubError(f"{self.spec} is only partly in the Hugging Face cache (missing {', '.join(missing)}) "
                           f"and downloads are off (HF_HUB_OFFLINE): run `pure-lite download {self.spec}` on a "
                           "connected machine")
        if missing:
            self.not_in_layout(", ".join(missing))
        return folder

    def not_in_layout(self, missing: str):
        raise CheckpointError(f"{self.spec} is not a model in PURE's layout (docs/pure-format.md §1): missing {missing}")

    def manifest_files(self, folder: Path) -> list[str]:
        """The files an export's manifest lists, each a plain name (it is checked in full when loaded)."""
        path = folder / MANIFEST_FILE
        try:
            files = json.loads(path.read_text(encoding="utf-8"))["files"]
            names = list(files)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.spec}: cannot read its {MANIFEST_FILE}: {_one_line(exc)}") from exc
        bad = [name for name in names if not isinstance(name, str) or _GLOB.search(name) or name.startswith("/")]
        if bad:
            raise CheckpointError(f"{self.spec}: {MANIFEST_FILE} lists file names that are not plain: {bad[:3]}")
        return names

    def shards(self, folder: Path) -> list[str]:
        """The safetensors files ``model.safetensors.index.json`` maps the weights to."""
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{self.spec}: cannot read its {INDEX_FILE}: {_one_line(exc)}") from exc
        bad = [n for n in names if not isinstance(n, str) or _GLOB.search(n) or "/" in n or not n.endswith(".safetensors")]
        if bad or not names:
            raise CheckpointError(f"{self.spec}: {INDEX_FILE} names no shards, or names that are not plain "
                                  f".safetensors files: {bad[:3]}")
        return names

    def convert_vq(self, folder: Path) -> Path:
        """Convert the VQ pickle (the repository's own, else LlamaGen's pinned one) into pure-lite's cache."""
        pickle = folder / VQ_PICKLE_FILE
        if pickle.is_file():
            sha256 = vq_cache.file_sha256(pickle)
        else:
            pinned = vq_cache.LLAMAGEN_VQ
            spec = f"{pinned.repo_id}@{pinned.revision}"
            try:
                pickle = self.fetch([pinned.filename], pinned.repo_id, pinned.revision) / pinned.filename
            except HubError as exc:
                raise HubError(f"{self.spec} has no image tokenizer, so pure-lite takes LlamaGen's; {exc}") from exc
            if not pickle.is_file():
                raise CheckpointError(f"{spec} has no {pinned.filename}, the VQ {self.spec} needs")
            sha256 = vq_cache.file_sha256(pickle)
            if sha256 != pinned.sha256:
                raise CheckpointError(
                    f"{pickle} ({spec}/{pinned.filename}) has sha256 {sha256}, not the {pinned.sha256} pinned in "
                    "pure_lite/vq_cache.py: refusing it (a changed or corrupt file, or a wrong pin)")
        converted = vq_cache.converted_path(sha256)
        if not converted.is_file():
            converted.parent.mkdir(parents=True, exist_ok=True)
            convert_vq(pickle, converted)  # weights_only=True: a pickle carrying code is refused, not run
        return converted


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())
