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
    for text, message in cases.items():
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
