"""An export folder confines every path it names, and a malformed manifest is one clear error.

The security tests watch every way a file can be opened while an export loads: Python's
``open`` audit event (builtins.open, io.open, os.open, pathlib, onnx.load), ONNX Runtime's
``InferenceSession`` and the ``tokenizers`` library's ``Tokenizer.from_file`` (both open files
natively, out of the audit hook's sight, so they are wrapped). The watcher is checked to see
each of them, and each hostile manifest is built so that, were the file outside opened, the
load would succeed: every outside file is a genuine copy with its correct sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure_lite.errors import ManifestError
from pure_lite.manifest import MANIFEST_FILE, Manifest, sha256_of
from pure_lite.restorer import DEFAULT_MODEL

ort = pytest.importorskip("onnxruntime", reason="the runtime tests need the [runtime] extra")

_WATCHED: list[tuple[Path, list]] = []  # (folder that must never be opened, where to record opens)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        _record(args[0], "open")


def _record(path, how: str) -> None:
    try:
        target = Path(os.fsdecode(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        return
    for folder, opened in _WATCHED:
        if target == folder or folder in target.parents:
            opened.append((how, str(target)))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while a watch is active


@pytest.fixture
def watch(monkeypatch):
    """``watch(folder)`` starts recording every open of a file under ``folder``; returns the list."""
    import tokenizers

    real_session, real_tokenizer = ort.InferenceSession, tokenizers.Tokenizer

    def session(path, *args, **kwargs):
        _record(path, "InferenceSession")
        return real_session(path, *args, **kwargs)

    class Tokenizer:
        @staticmethod
        def from_file(path, *args, **kwargs):
            _record(path, "Tokenizer.from_file")
            return real_tokenizer.from_file(path, *args, **kwargs)

        from_str = staticmethod(real_tokenizer.from_str)  # pure-lite reads the file itself: seen as an open

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(tokenizers, "Tokenizer", Tokenizer)

    def start(folder: Path) -> list:
        opened: list = []
        _WATCHED.append((folder.resolve(), opened))
        return opened

    yield start
    _WATCHED.clear()


@pytest.fixture
def export(tmp_path) -> Path:
    """A copy of the shipped PURE-tiny export, and beside it ``outside/``: genuine copies of its files."""
    folder = tmp_path / "export"
    shutil.copytree(DEFAULT_MODEL, folder)
    shutil.copytree(DEFAULT_MODEL, tmp_path / "outside")
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def _save(folder: Path, data: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def _load_everything(folder: Path) -> None:
    from pure_lite.runtime import load_components

    load_components(folder, providers=["CPUExecutionProvider"])


def test_the_watcher_sees_every_kind_of_open(export, watch):
    outside = export.parent / "outside"
    opened = watch(outside)
    (outside / "tokenizer.json").read_bytes()
    import tokenizers

    tokenizers.Tokenizer.from_file(str(outside / "tokenizer.json"))
    ort.InferenceSession(str(outside / "lm_head.onnx"), providers=["CPUExecutionProvider"])
    hows = {how for how, _ in opened}
    assert {"open", "Tokenizer.from_file", "InferenceSession"} <= hows, opened


def test_an_untouched_copy_loads(export, watch):
    opened = watch(export.parent / "outside")
    _load_everything(export)
    assert opened == []


def _absolute_file_entry(folder: Path) -> str:
    data = _manifest(folder)
    secret = folder.parent / "outside" / "tokenizer.json"
    data["files"][str(secret)] = {"sha256": sha256_of(secret), "bytes": secret.stat().st_size}
    _save(folder, data)
    return "absolute path"


def _climbing_graph(folder: Path) -> str:
    data = _manifest(folder)
    name = "../" * 12 + str((folder.parent / "outside" / "vq_decoder.onnx").resolve()).lstrip("/")
    data["graphs"]["vq_decoder"]["file"] = name
    data["files"][name] = {"sha256": sha256_of(folder.parent / "outside" / "vq_decoder.onnx")}
    _save(folder, data)
    return r"'\.\.'"


def _climbing_tokenizer(folder: Path) -> str:
    data = _manifest(folder)
    data["tokens"]["tokenizer"] = "../outside/tokenizer.json"
    data["files"]["../outside/tokenizer.json"] = {"sha256": sha256_of(folder / "tokenizer.json")}
    _save(folder, data)
    return r"'\.\.'"


def _absolute_tokenizer_without_checksum(folder: Path) -> str:
    data = _manifest(folder)
    data["tokens"]["tokenizer"] = str(folder.parent / "outside" / "tokenizer.json")
    _save(folder, data)
    return "absolute path"


def _symlinked_tokenizer(folder: Path) -> str:
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(folder.parent / "outside" / "tokenizer.json")
    return "symbolic link"


def _symlinked_weights(folder: Path) -> str:
    (folder / "decoder.onnx.data").unlink()
    (folder / "decoder.onnx.data").symlink_to(folder.parent / "outside" / "decoder.onnx.data")
    return "symbolic link"


def _symlinked_folder(folder: Path) -> str:
    """A sub-folder that is a link to the outside, with the graph named through it."""
    (folder / "sub").symlink_to(folder.parent / "outside")
    data = _manifest(folder)
    data["graphs"]["lm_head"]["file"] = "sub/lm_head.onnx"
    data["files"]["sub/lm_head.onnx"] = {"sha256": sha256_of(folder / "lm_head.onnx")}
    _save(folder, data)
    return "symbolic link"


def _symlinked_manifest(folder: Path) -> str:
    (folder / MANIFEST_FILE).unlink()
    (folder / MANIFEST_FILE).symlink_to(folder.parent / "outside" / MANIFEST_FILE)
    return "symbolic link"


HOSTILE = [_absolute_file_entry, _climbing_graph, _climbing_tokenizer, _absolute_tokenizer_without_checksum,
           _symlinked_tokenizer, _symlinked_weights, _symlinked_folder, _symlinked_manifest]


@pytest.mark.parametrize("make_hostile", HOSTILE, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("verify_checksums", [True, False], ids=["checksums", "no-checksums"])
def test_nothing_outside_the_folder_is_ever_opened(export, watch, make_hostile, verify_checksums):
    reason = make_hostile(export)
    opened = watch(export.parent / "outside")
    with pytest.raises(ManifestError, match=reason):
        Manifest.load(export, verify_checksums=verify_checksums)
    from pure_lite.runtime import load_components

    with pytest.raises(ManifestError, match=reason):
        load_components(export, providers=["CPUExecutionProvider"], verify_checksums=verify_checksums)
    assert opened == []


def test_dotdot_is_refused_even_when_it_lands_inside(export):
    data = _manifest(export)
    data["tokens"]["tokenizer"] = "sub/../tokenizer.json"
    data["files"]["sub/../tokenizer.json"] = data["files"]["tokenizer.json"]
    (export / "sub").mkdir()
    _save(export, data)
    with pytest.raises(ManifestError, match=r"refused 'sub/\.\./tokenizer.json'"):
        Manifest.load(export)


def test_tokenizer_must_have_a_checksum(export, watch):
    """A tokenizer inside the folder but absent from ``files`` is refused before it is read."""
    shutil.copy(export / "tokenizer.json", export / "other.json")
    data = _manifest(export)
    data["tokens"]["tokenizer"] = "other.json"
    _save(export, data)
    opened = watch(export / "other.json")
    with pytest.raises(ManifestError, match=r"tokens.tokenizer: 'other.json' is not listed in 'files'"):
        _load_everything(export)
    assert opened == []


def _drop(path: list[str]):
    def mutate(data):
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]
        return data
    return mutate


MALFORMED = {
    "graph without file": (_drop(["graphs", "decoder", "file"]), "'graphs.decoder.file' is missing"),
    "empty files entry": (lambda d: d["files"].update({"tokenizer.json": {}}), "'files.tokenizer.json.sha256' is missing"),
    "graphs is a list": (lambda d: d.update(graphs=[]), "'graphs' must be an object"),
    "no graphs": (lambda d: d.update(graphs={}), "'graphs' lists no graphs"),
    "no tokenizer": (_drop(["tokens", "tokenizer"]), "'tokens.tokenizer' is missing"),
    "size is text": (lambda d: d["model"].update(hidden_size="256"), "'model.hidden_size' must be an integer"),
    "bad digest": (lambda d: d["files"]["tokenizer.json"].update(sha256="abc"), "not a sha256"),
    "no quantization": (_drop(["quantization"]), "'quantization' is missing"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_manifest_names_the_field(export, case):
    mutate, message = MALFORMED[case]
    data = _manifest(export)
    mutate(data)
    _save(export, data)
    with pytest.raises(ManifestError, match=message):
        Manifest.load(export)


def test_manifest_that_is_not_an_object(export):
    (export / MANIFEST_FILE).write_text("[]")
    with pytest.raises(ManifestError, match="must be a JSON object, got list"):
        Manifest.load(export)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pure_lite.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_reports_a_malformed_or_hostile_export_in_one_line(export, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
    cases = {
        "[]": "must be a JSON object",
        json.dumps(dict(_manifest(export), graphs=[])): "'graphs' must be an object",
    }
    hostile = _manifest(export)
    hostile["tokens"]["tokenizer"] = "../../../../../../etc/passwd"
    cases[json.dumps(hostile)] = "refused '../../../../../../etc/passwd'"
    zero = _manifest(export)
    zero["model"]["image_size"] = 0
    cases[json.dumps(zero)] = "image_size must be a multiple of 32"
    cases[500 << 20] = "is 524288000 bytes, more than the 16 MB"  # a sparse 500 MB manifest: refused unread
    for text, message in cases.items():
        if isinstance(text, int):
            with open(export / MANIFEST_FILE, "r+b") as f:
                f.truncate(text)
        else:
            (export / MANIFEST_FILE).write_text(text)
        out = tmp_path / "out.png"
        result = _cli("restore", str(photo), "-o", str(out), "--model", str(export), "-q")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert not out.exists()


def test_an_export_folder_gets_the_modes_of_a_plain_mkdir(tmp_path):
    """Exporters build in a private temporary folder (mkdtemp: 0700, some files 0600);
    write_manifest, their last step, gives it the modes a plain mkdir/open would."""
    from pure_lite.manifest import write_manifest

    old = os.umask(0o027)
    try:
        folder = tmp_path / "work"
        folder.mkdir(mode=0o700)
        (folder / "graph.onnx").write_bytes(b"x")
        (folder / "graph.onnx").chmod(0o600)
        write_manifest(folder, {"graphs": {}}, ["graph.onnx"])
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {"graph.onnx": 0o640, MANIFEST_FILE: 0o640}


def _list(folder: Path, data: dict, name: str) -> None:
    data["files"][name] = {"sha256": sha256_of(folder / name), "bytes": (folder / name).stat().st_size}


def test_external_data_is_found_beside_its_graph(export, watch):
    """ONNX Runtime reads a tensor's external data from the graph file's own folder. A graph moved into a
    subfolder therefore reads the .data file there: refused unless that file is listed (with its checksum),
    even when a listed file of the same name lies at the top of the folder."""
    (export / "sub").mkdir()
    shutil.move(export / "lm_head.onnx", export / "sub" / "lm_head.onnx")
    weights = np.frombuffer((export / "lm_head.onnx.data").read_bytes(), np.uint8).copy()
    weights[:4096] ^= 0x55  # what a swapped, unhashed file would feed the model
    (export / "sub" / "lm_head.onnx.data").write_bytes(weights.tobytes())
    data = _manifest(export)
    del data["files"]["lm_head.onnx"]
    data["graphs"]["lm_head"]["file"] = "sub/lm_head.onnx"
    _list(export, data, "sub/lm_head.onnx")
    _save(export, data)
    with pytest.raises(ManifestError, match=r"external data 'sub/lm_head.onnx.data' is not listed"):
        _load_everything(export)
    _list(export, data, "sub/lm_head.onnx.data")  # listed with its checksum: it is the file ONNX Runtime reads
    _save(export, data)
    opened = watch(export.parent / "outside")
    _load_everything(export)
    assert opened == []


def _graph_with_external(tensor_place: str, location: str):
    """A one-node ONNX model whose only external tensor sits in ``tensor_place``: a sparse initializer's
    values, or a Constant node's sparse value."""
    from onnx import TensorProto, helper

    values = TensorProto(name="values", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    sparse = helper.make_sparse_tensor(values, helper.make_tensor("indices", TensorProto.INT64, [1], [0]), [4])
    x = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4])
    if tensor_place == "sparse initializer":
        nodes, extra = [helper.make_node("Add", ["hidden", "values"], ["logits"])], {"sparse_initializer": [sparse]}
    else:
        nodes = [helper.make_node("Constant", [], ["c"], sparse_value=sparse),
                 helper.make_node("Add", ["hidden", "c"], ["logits"])]
        extra = {}
    graph = helper.make_graph(nodes, "g", [x], [y], **extra)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("place", ["sparse initializer", "sparse constant"])
@pytest.mark.parametrize("location", ["../outside/lm_head.onnx.data", "/etc/hostname", "unlisted.data"])
def test_sparse_tensors_external_data_is_checked(export, watch, place, location):
    import onnx

    shutil.copy(export / "lm_head.onnx.data", export / "unlisted.data")
    onnx.save(_graph_with_external(place, location), export / "lm_head.onnx")
    data = _manifest(export)
    _list(export, data, "lm_head.onnx")
    _save(export, data)
    opened = watch(export.parent / "outside")
    message = "is not listed" if location == "unlisted.data" else "must be a plain relative path"
    with pytest.raises(ManifestError, match=message):
        _load_everything(export)
    assert opened == []


# (field, value) -> the error names the field; each would allocate, divide by zero or misplace tiles later
IMPLAUSIBLE = {
    "image_size 0": (("model", "image_size"), 0), "image_size -128": (("model", "image_size"), -128),
    "image_size 100": (("model", "image_size"), 100), "image_size 1e6": (("model", "image_size"), 10 ** 6),
    "head_dim 1e12": (("model", "head_dim"), 10 ** 12), "layers 1e9": (("model", "num_hidden_layers"), 10 ** 9),
    "layers 9": (("model", "num_hidden_layers"), 9), "vocab 1e30": (("model", "vocab_size"), 10 ** 30),
    "heads 0": (("model", "num_attention_heads"), 0), "head_dim 32": (("model", "head_dim"), 32),
    "codebook 0": (("tokens", "codebook_size"), 0), "token vocab": (("tokens", "vocab_size"), 1305),
}


@pytest.mark.parametrize("case", IMPLAUSIBLE, ids=list(IMPLAUSIBLE))
def test_implausible_model_numbers_are_refused_at_load(export, case):
    (section, key), value = IMPLAUSIBLE[case]
    data = _manifest(export)
    data[section][key] = value
    _save(export, data)
    with pytest.raises(ManifestError, match=rf"{MANIFEST_FILE}: .*{key}"):
        Manifest.load(export, verify_checksums=False)


def test_oversized_or_deeply_nested_manifests_are_refused_before_parsing(export):
    with open(export / MANIFEST_FILE, "r+b") as f:
        f.truncate(500 << 20)  # sparse: no disk, but 500 MB (and gigabytes of JSON objects) if it were read
    with pytest.raises(ManifestError, match=r"is 524288000 bytes, more than the 16 MB"):
        Manifest.load(export)
    (export / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nested too deeply"):
        Manifest.load(export)
    (export / MANIFEST_FILE).unlink()
    os.mkfifo(export / MANIFEST_FILE)
    with pytest.raises(ManifestError, match="not a regular file"):
        Manifest.load(export)


def test_an_export_in_a_hugging_face_cache_snapshot_loads(export, tmp_path):
    """The hub layout: the snapshot's files are links into the repository's blobs/, which is allowed;
    a link into another repository's blobs is not."""
    repo = tmp_path / "hub" / "models--org--pure-tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for path in export.iterdir():
        digest = sha256_of(path)
        shutil.move(path, repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(Path("../../blobs") / digest)
    _load_everything(snapshot)
    elsewhere = tmp_path / "hub" / "models--other--repo" / "blobs"
    elsewhere.mkdir(parents=True)
    shutil.copy(snapshot / "tokenizer.json", elsewhere / "tok")
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(Path("../../../models--other--repo/blobs/tok"))
    with pytest.raises(ManifestError, match="symbolic link"):
        Manifest.load(snapshot)
