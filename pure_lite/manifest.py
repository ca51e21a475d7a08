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

from .atomic import publish_folder_modes
from .errors import ManifestError, MissingDependencyError
from .model_dims import check_heads, check_image_size, check_int, check_scale
from .model_files import MAX_MANIFEST_BYTES, allowed_roots, read_json, require_regular

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


def inside_path(root: Path, name, where: str) -> Path:
    """``root / name`` if ``name`` is a plain relative path that stays inside ``root`` after
    resolving symlinks (or, in a Hugging Face cache snapshot, inside its repository's blobs:
    pure_lite.model_files.allowed_roots); otherwise ManifestError naming ``where``. Only the file
    system's metadata is consulted (lstat/readlink): nothing is opened.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise ManifestError(f"{where}: {name!r} is not a file name")
    if os.path.isabs(name) or Path(name).drive:
        reason = "it is an absolute path"
    elif ".." in Path(name).parts:
        reason = "'..' can lead outside the folder"
    else:
        try:
            target = (root / name).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise ManifestError(f"{where}: cannot resolve {name!r}: {exc}") from None
        if any(r in target.parents for r in allowed_roots(root)):
            return root / name
        reason = f"it resolves to {target}, outside the folder (a symbolic link?)"
    raise ManifestError(f"{where}: refused {name!r}: {reason}; an export's files must lie inside {root}")


def check_external_data(graph: Path, root: Path) -> list[str]:
    """The external-data files a graph refers to, as names relative to ``root``; ManifestError for any
    that is not a plain relative path or that leaves ``root``.

    A tensor's location is resolved against the graph file's own folder, as ONNX Runtime does, so a
    graph in a subfolder names its data in that subfolder. Every tensor a graph can hold is checked:
    initializers, the values and indices of sparse initializers, and the tensors of node attributes
    (Constant's ``value``/``sparse_value`` and the like), in subgraphs and functions too.
    """
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("checking exported graphs needs the onnx package: pip install onnx") from exc
    require_regular(graph, ManifestError)
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except RecursionError:
        raise ManifestError(f"{graph} is not a readable ONNX graph: nested too deeply") from None
    except Exception as exc:  # protobuf DecodeError and friends
        raise ManifestError(f"{graph} is not a readable ONNX graph: {exc}") from exc
    folder = graph.parent.relative_to(root)
    locations = set()
    for tensor in _all_tensors(model, onnx):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            where = f"{graph.relative_to(root)}: tensor {tensor.name!r}'s external data"
            if not isinstance(location, str) or not location or os.path.isabs(location) or Path(location).drive \
                    or ".." in Path(location).parts:
                raise ManifestError(f"{where}: refused {location!r}: an external-data location must be a plain "
                                    "relative path beside its graph")
            name = (folder / location).as_posix()
            inside_path(root, name, where)
            locations.add(name)
    return sorted(locations)


def _all_tensors(model, onnx):
    """Every TensorProto of a model: graph initializers, sparse initializers' values and indices, and node
    attribute tensors (dense and sparse), through subgraphs and functions."""

    def sparse(s):
        yield s.values
        yield s.indices

    def of_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from sparse(attr.sparse_tensor)
                for s in attr.sparse_tensors:
                    yield from sparse(s)
                if attr.HasField("g"):
                    yield from of_graph(attr.g)
                for g in attr.graphs:
                    yield from of_graph(g)

    def of_graph(graph):
        yield from graph.initializer
        for s in graph.sparse_initializer:
            yield from sparse(s)
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)


def _require(container: dict, key: str, kind: type | tuple, where: str):
    """``container[key]`` if present and of ``kind``; otherwise ManifestError naming the field."""
    field = f"{where}.{key}" if where else key
    if key not in container:
        raise ManifestError(f"field {field!r} is missing")
    value = container[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer",
                             type(None): "null"}[k] for k in kinds)
        raise ManifestError(f"field {field!r} must be {names}, got {json.dumps(value)[:60]}")
    return value


_MODEL_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
               "max_position_embeddings")
_TOKEN_INTS = ("vocab_size", "codebook_size", "image_start", "end_of_turn")


def check_structure(data: dict) -> None:
    """Every field the runtime reads is present and of the right type (ManifestError names the one that is not)."""
    files = _require(data, "files", dict, "")
    for name in files:
        digest = _require(_require(files, name, dict, "files"), "sha256", str, f"files.{name}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise ManifestError(f"field 'files.{name}.sha256' is not a sha256 hex digest")
    graphs = _require(data, "graphs", dict, "")
    if not graphs:
        raise ManifestError("field 'graphs' lists no graphs")
    for name in graphs:
        graph = _require(graphs, name, dict, "graphs")
        _require(graph, "file", str, f"graphs.{name}")
        for key in ("inputs", "outputs"):
            if not all(isinstance(v, str) for v in _require(graph, key, list, f"graphs.{name}")):
                raise ManifestError(f"field 'graphs.{name}.{key}' must list names (strings)")
    model = _require(data, "model", dict, "")
    for key in _MODEL_INTS:
        check_int("field 'model'", key, _require(model, key, int, "model"), ManifestError)
    if "image_size" in model:
        check_image_size("field 'model'", "image_size", _require(model, "image_size", int, "model"), ManifestError)
    if "scale" in model:  # optional, as image_size: absent in exports made before they were recorded
        check_scale("field 'model'", "scale", _require(model, "scale", int, "model"), ManifestError)
    heads, kv_heads, head_dim = model.get("num_attention_heads"), model["num_key_value_heads"], model["head_dim"]
    if heads is not None:
        check_heads("field 'model'", check_int("field 'model'", "num_attention_heads", heads, ManifestError),
                    kv_heads, ManifestError)
    if (heads or kv_heads) * head_dim != model["hidden_size"]:
        raise ManifestError(f"field 'model': {'num_attention_heads' if heads else 'num_key_value_heads'} x head_dim "
                            f"is {(heads or kv_heads) * head_dim}, not hidden_size {model['hidden_size']}")
    decoder = graphs.get("decoder")
    if decoder is not None:  # past and new keys/values: one input and one output per layer and key/value
        layers = model["num_hidden_layers"]
        if len(decoder["inputs"]) != 3 + 2 * layers or len(decoder["outputs"]) != 1 + 2 * layers:
            raise ManifestError(f"field 'model.num_hidden_layers' is {layers}, but graphs.decoder has "
                                f"{len(decoder['inputs'])} inputs and {len(decoder['outputs'])} outputs")
    tokens = _require(data, "tokens", dict, "")
    _require(tokens, "tokenizer", str, "tokens")
    for key in _TOKEN_INTS:
        _require(tokens, key, int, "tokens")
    check_int("field 'tokens'", "codebook_size", tokens["codebook_size"], ManifestError)
    if tokens["vocab_size"] != model["vocab_size"] or tokens["codebook_size"] >= tokens["vocab_size"]:
        raise ManifestError(f"field 'tokens': vocab_size {tokens['vocab_size']} and codebook_size "
                            f"{tokens['codebook_size']} disagree with model.vocab_size {model['vocab_size']}")
    _require(_require(data, "quantization", dict, ""), "weights", (str, type(None)), "quantization")


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
        if graph not in self.graphs:
            raise ManifestError(f"{self.root}: the manifest lists no {graph!r} graph; export the model again")
        return self.root / self.graphs[graph]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.data["tokens"]["tokenizer"]

    @classmethod
    def load(cls, root: str | os.PathLike, *, verify_checksums: bool = True) -> "Manifest":
        """Read and check a manifest before any file it names is opened.

        In order, each with its own ManifestError: the manifest's structure and format version;
        every path (listed files, graphs, the tokenizer) a plain relative path inside ``root``
        after resolving symlinks, and every graph and the tokenizer listed with a checksum;
        every listed file present; the sha256 of every file; every graph's external data
        inside ``root`` and listed.
        """
        root = Path(root)
        path = root / MANIFEST_FILE
        if not path.exists():
            raise ManifestError(f"{root} has no {MANIFEST_FILE}: not a pure-lite export")
        inside_path(root, MANIFEST_FILE, str(root))
        data = read_json(path, MAX_MANIFEST_BYTES, ManifestError)
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: the manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"{path}: format_version {version!r} is not supported by this pure-lite (supports {SUPPORTED_VERSIONS})"
            )
        try:
            check_structure(data)
            files = data["files"]
            for name in files:
                inside_path(root, name, "files")
            named = {f"graphs.{g}.file": entry["file"] for g, entry in data["graphs"].items()}
            named["tokens.tokenizer"] = data["tokens"]["tokenizer"]
            for field, name in named.items():
                inside_path(root, name, field)
                if name not in files:
                    raise ManifestError(f"{field}: {name!r} is not listed in 'files' (no checksum)")
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        missing = [name for name in files if not (root / name).is_file()]
        if missing:
            raise ManifestError(f"{root}: files listed in the manifest are missing: {', '.join(missing)}")
        if verify_checksums:
            for name, entry in files.items():
                if sha256_of(root / name) != entry["sha256"].lower():
                    raise ManifestError(f"{root / name} does not match its sha256 in the manifest (changed or corrupt)")
        for graph in data["graphs"].values():
            for location in check_external_data(root / graph["file"], root):
                if location not in files:
                    raise ManifestError(f"{graph['file']}: external data {location!r} is not listed in the manifest "
                                        "(no checksum)")
        return cls(root=root, data=data)


def write_manifest(root: Path, data: dict, files: list[str]) -> Path:
    """Write the manifest with the checksums of ``files`` (names relative to ``root``): the last step
    of building an export folder, so it also gives the folder and its files the modes a plain
    mkdir/open would have (the builders work in a private temporary folder; pure_lite.atomic)."""
    data = dict(data, format_version=FORMAT_VERSION, files=file_entries(root, files))
    path = root / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    publish_folder_modes(root)
    return path
