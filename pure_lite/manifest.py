"""``pure_lite_manifest.json``: what an exported folder holds, and the checks run before serving it.

Written by ``pure_lite.export``, read by ``pure_lite.runtime``. It records the model's
dimensions, the graphs and their I/O names, the token layout (special ids; the image
id<->code table is rebuilt from the shipped ``tokenizer.json``), sampling defaults, the
quantization, the opset, and the sha256 of every file. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ManifestError, MissingDependencyError

MANIFEST_FILE = "pure_lite_manifest.json"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"sha256": sha256_of(root / name), "bytes": (root / name).stat().st_size} for name in sorted(names)}


def _inside(root: Path, relative: str) -> bool:
    if os.path.isabs(relative):
        return False
    target = (root / relative).resolve()
    return target == root or root in target.parents


def check_external_data(graph: Path, root: Path) -> list[str]:
    """External-data files a graph refers to; raise ManifestError for any path outside ``root``."""
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("checking exported graphs needs the onnx package: pip install onnx") from exc
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ManifestError(f"{graph} is not a readable ONNX graph: {exc}") from exc
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            if not _inside(root.resolve(), location):
                raise ManifestError(
                    f"{graph.name}: tensor {tensor.name!r} points to external data {location!r} outside {root}"
                )
            locations.add(location)
    return sorted(locations)


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def quantization(self) -> str:
        return self.data["quantization"]["weights"]

    def path(self, graph: str) -> Path:
        return self.root / self.graphs[graph]["file"]

    @classmethod
    def load(cls, root: str | os.PathLike, *, verify_checksums: bool = True) -> "Manifest":
        """Read and check a manifest: version, every file present, external data inside, checksums."""
        root = Path(root)
        path = root / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(f"{root} has no {MANIFEST_FILE}: not a pure-lite export") from exc
        except (OSError, ValueError) as exc:
            raise ManifestError(f"cannot read {path}: {exc}") from exc
        version = data.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"{path}: format_version {version!r} is not supported by this pure-lite (supports {SUPPORTED_VERSIONS})"
            )
        files = data.get("files", {})
        missing = [name for name in files if not (root / name).is_file()]
        if missing:
            raise ManifestError(f"{root}: files listed in the manifest are missing: {', '.join(missing)}")
        for name, graph in data.get("graphs", {}).items():
            if graph["file"] not in files:
                raise ManifestError(f"{path}: graph {name!r} file {graph['file']!r} has no checksum entry")
            for location in check_external_data(root / graph["file"], root):
                if location not in files:
                    raise ManifestError(f"{graph['file']}: external data {location!r} is not listed in the manifest")
        if verify_checksums:
            for name, entry in files.items():
                if sha256_of(root / name) != entry["sha256"]:
                    raise ManifestError(f"{root / name} does not match its sha256 in the manifest (changed or corrupt)")
        return cls(root=root, data=data)


def write_manifest(root: Path, data: dict, files: list[str]) -> Path:
    """Write the manifest with the checksums of ``files`` (names relative to ``root``)."""
    data = dict(data, format_version=FORMAT_VERSION, files=file_entries(root, files))
    path = root / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
