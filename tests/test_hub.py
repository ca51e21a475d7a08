"""Models named by a Hugging Face Hub id, resolved offline from a cache laid out as huggingface_hub writes it.

No test uses the network: ``pure_lite.testing.write_hub_cache`` puts a tiny checkpoint (and a LlamaGen-style
VQ repository) into a temporary HF_HUB_CACHE, and huggingface_hub runs with HF_HUB_OFFLINE. The few tests of
the library's answers (unknown revision, gated repository, no connection) point HF_ENDPOINT at a server on
127.0.0.1 that this test starts, or at a closed port.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

huggingface_hub = pytest.importorskip("huggingface_hub")
import huggingface_hub.constants  # noqa: E402  (a submodule the package loads lazily)

from pure_lite import vq_cache  # noqa: E402
from pure_lite.checkpoint import IMAGE_SIZE_KEY, VQ_PICKLE_FILE, CheckpointFiles  # noqa: E402
from pure_lite.errors import CheckpointError, HubError  # noqa: E402
from pure_lite.hub import parse_hub_id, resolve_model  # noqa: E402
from pure_lite.restorer import DEFAULT_MODEL, Restorer  # noqa: E402
from pure_lite.sampling import SamplingConfig  # noqa: E402
from pure_lite.testing import write_hub_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0.0, cfg_scale=1.0, max_text_tokens=12)  # a short text: the tests are fast
LLAMAGEN_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the stand-in's commit (the real pin is another)


def _model_files(folder: Path) -> list[str]:
    """A checkpoint's files as PURE's repository has them: no VQ."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name in ("config.json", "tokenizer.json") or p.name.startswith("model"))


def _listing(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with what it is (a link's target, a file's sha256): to show nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache and an empty pure-lite cache, for this process and its subprocesses."""
    cache, own = tmp_path / "hf", tmp_path / "pure-lite-cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1"), ("PURE_LITE_CACHE", str(own)),
                        ("HF_HUB_DISABLE_TELEMETRY", "1")):
        monkeypatch.setenv(name, value)
    # huggingface_hub read the environment when first imported: set what it reads at call time too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def llamagen(hub, tiny_pure, monkeypatch):
    """A LlamaGen repository in the cache holding the tiny checkpoint's VQ, and the pin moved to it."""
    pickle = tiny_pure / VQ_PICKLE_FILE
    write_hub_cache(hub, vq_cache.LLAMAGEN_VQ.repo_id, tiny_pure, files=[VQ_PICKLE_FILE], commit=LLAMAGEN_COMMIT)
    sha256 = hashlib.sha256(pickle.read_bytes()).hexdigest()
    monkeypatch.setattr(vq_cache, "LLAMAGEN_VQ", vq_cache.PinnedFile(
        vq_cache.LLAMAGEN_VQ.repo_id, VQ_PICKLE_FILE, LLAMAGEN_COMMIT, sha256))
    return sha256


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert parse_hub_id("nonwhy/PURE") == ("nonwhy/PURE", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("PURE", "/abs/path", "./org/name", "a/b/c", "org/name@", "org--x/name", "org/../x", "org/n@-x"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == Path("org/name")  # an existing path stays a path
    assert resolve_model("nowhere") == Path("nowhere")  # and a missing one is reported by the loader
    with pytest.raises(ValueError, match="revision"):
        resolve_model("org/name", revision="main")


def test_checkpoint_from_the_hub_restores_what_its_folder_restores(hub, llamagen, tiny_pure, rgb_image):
    snapshot = write_hub_cache(hub, "org/tiny", tiny_pure, files=_model_files(tiny_pure))
    before = _listing(hub)
    from_hub = Restorer.from_pretrained("org/tiny").restore(rgb_image, sampling=GREEDY, target_size=32)
    from_folder = Restorer.from_pretrained(tiny_pure).restore(rgb_image, sampling=GREEDY, target_size=32)
    np.testing.assert_array_equal(from_hub.tokens, from_folder.tokens)
    np.testing.assert_array_equal(np.asarray(from_hub.image), np.asarray(from_folder.image))
    converted = vq_cache.converted_path(llamagen)
    assert converted.is_file() and CheckpointFiles.locate(snapshot).vq == converted
    assert _listing(hub) == before  # Hugging Face's cache is only read


def test_export_from_the_hub_runs_on_the_runtime_like_its_folder(hub, rgb_image):
    pytest.importorskip("onnxruntime")
    write_hub_cache(hub, "org/pure-tiny", DEFAULT_MODEL, revision="v1")
    from_hub = Restorer.from_pretrained("org/pure-tiny@v1")
    assert from_hub.components.description.startswith("onnxruntime")
    a = from_hub.restore(rgb_image, sampling=GREEDY, target_size=32)
    b = Restorer.from_pretrained(DEFAULT_MODEL).restore(rgb_image, sampling=GREEDY, target_size=32)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_export_files_are_checked_by_their_manifest(hub, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for p in DEFAULT_MODEL.iterdir():
        (export / p.name).write_bytes(p.read_bytes())
    (export / "tokenizer.json").write_bytes((export / "tokenizer.json").read_bytes() + b" ")
    write_hub_cache(hub, "org/changed", export)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        Restorer.from_pretrained("org/changed")


def test_a_snapshot_link_leading_anywhere_but_its_blobs_is_refused(hub, tmp_path):
    from pure_lite.errors import ManifestError
    from pure_lite.manifest import Manifest

    snapshot = write_hub_cache(hub, "org/linked", DEFAULT_MODEL)
    outside = tmp_path / "tokenizer.json"
    outside.write_bytes((DEFAULT_MODEL / "tokenizer.json").read_bytes())  # same bytes, same sha256
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the folder"):
        Manifest.load(snapshot)


def test_the_converted_vq_is_reused_and_redone_when_the_pickle_changes(hub, tiny_pure, tmp_path, monkeypatch):
    import pure_lite.hub as hub_module

    conversions = []
    real = hub_module.convert_vq
    monkeypatch.setattr(hub_module, "convert_vq", lambda src, dst: conversions.append(dst) or real(src, dst))
    names = _model_files(tiny_pure) + [VQ_PICKLE_FILE]
    first = write_hub_cache(hub, "org/own-vq", tiny_pure, files=names)
    assert resolve_model("org/own-vq") == first and resolve_model("org/own-vq") == first
    assert len(conversions) == 1  # the second load found the conversion

    changed = tmp_path / "changed"
    changed.mkdir()
    for name in names:
        (changed / name).symlink_to(tiny_pure / name)
    (changed / VQ_PICKLE_FILE).unlink()
    state = torch.load(tiny_pure / VQ_PICKLE_FILE, weights_only=True)
    first_key = next(iter(state["model"]))
    state["model"][first_key] = state["model"][first_key] + 1.0
    torch.save(state, changed / VQ_PICKLE_FILE)
    second = write_hub_cache(hub, "org/own-vq", changed, files=names)  # a new commit on main
    assert second != first and resolve_model("org/own-vq") == second
    assert len(conversions) == 2 and conversions[0] != conversions[1]
    from pure_lite.checkpoint import load_vq_state_dict

    loaded = load_vq_state_dict(CheckpointFiles.locate(second).vq)
    torch.testing.assert_close(loaded[first_key], state["model"][first_key], rtol=0, atol=0)


class _Payload:
    """Unpickling this runs code: it writes the file named in ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_vq_pickle_carrying_code_is_refused_and_never_run(hub, tiny_pure, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in _model_files(tiny_pure):
        (evil / name).symlink_to(tiny_pure / name)
    torch.save({"model": _Payload(marker)}, evil / VQ_PICKLE_FILE)
    write_hub_cache(hub, "org/evil", evil)
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        Restorer.from_pretrained("org/evil")
    assert not marker.exists()
    assert not (vq_cache.cache_dir() / "vq").exists() or not any((vq_cache.cache_dir() / "vq").iterdir())


def test_a_llamagen_vq_that_does_not_match_the_pin_is_refused(hub, tiny_pure):
    pinned = vq_cache.LLAMAGEN_VQ  # the real pin; the stand-in file's sha256 is another
    write_hub_cache(hub, pinned.repo_id, tiny_pure, files=[VQ_PICKLE_FILE], commit=pinned.revision)
    write_hub_cache(hub, "org/tiny", tiny_pure, files=_model_files(tiny_pure))
    with pytest.raises(CheckpointError, match=f"not the {pinned.sha256} pinned"):
        resolve_model("org/tiny")


def test_download_reports_the_folder_and_size(hub, llamagen, tiny_pure, capsys):
    from pure_lite.cli import main

    snapshot = write_hub_cache(hub, "org/tiny", tiny_pure, files=_model_files(tiny_pure))
    assert main(["download", "org/tiny"]) == 0
    out = capsys.readouterr().out
    assert str(snapshot) in out and "GB" in out and str(vq_cache.converted_path(llamagen)) in out


def test_the_readme_command_for_the_real_model_runs_from_the_cache(hub, llamagen, tiny_pure, tmp_path, monkeypatch):
    """README's one command, with the tiny checkpoint standing in for nonwhy/PURE (trained side 32, so one tile;
    a 12-token text budget added, since a random model would write text up to the default limit)."""
    from pure_lite.cli import main

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The real PURE", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.strip().startswith("pure-lite restore")]
    assert len(commands) == 1 and "--model nonwhy/PURE" in commands[0], commands
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    for name in _model_files(tiny_pure):
        (stand_in / name).symlink_to(tiny_pure / name)
    (stand_in / "config.json").unlink()
    config = json.loads((tiny_pure / "config.json").read_text())
    (stand_in / "config.json").write_text(json.dumps({**config, IMAGE_SIZE_KEY: 32}))
    write_hub_cache(hub, "nonwhy/PURE", stand_in)
    monkeypatch.chdir(tmp_path)
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save("photo.jpg")
    argv = shlex.split(commands[0])[1:]
    argv[argv.index("--device") + 1] = "cpu"  # the README's is cuda
    argv += ["--max-text-tokens", "12", "--seed", "0", "-q"]  # a random model's text is cut short: seconds, not minutes
    assert main(argv) == 0
    output = argv[argv.index("-o") + 1]
    assert Image.open(output).size == (32, 32)


@pytest.mark.parametrize("command", [["restore", "photo.png", "-o", "out.png"], ["restore-many", "in", "-o", "out"]])
def test_cli_resolves_a_hub_id_before_checking_load_options(hub, command, tmp_path, monkeypatch, capsys):
    """--quantize is refused for an export named by its Hub id: the id was resolved to the export's folder."""
    from pure_lite.cli import main

    write_hub_cache(hub, "org/pure-tiny", DEFAULT_MODEL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    assert main([*command, "--model", "org/pure-tiny", "--quantize", "int8"]) == 2
    assert "--quantize int8 applies to a checkpoint folder (the torch backend); org/pure-tiny is an export" \
        in capsys.readouterr().err


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pure_lite.cli", *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_cli_offline_and_not_cached_is_one_line_naming_the_download_command(hub, tmp_path):
    result = _cli("restore", str(ROOT / "examples/images/photo.png"), "-o", str(tmp_path / "out.png"),
                  "--model", "org/absent")
    assert result.returncode == 2
    line = _error_line(result)
    assert "org/absent" in line and "pure-lite download org/absent" in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "out.png").exists()


def test_cli_repository_not_in_pures_layout_names_the_missing_file(hub, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "README.md").write_text("a model of another kind")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    write_hub_cache(hub, "org/other", folder)
    result = _cli("export", "org/other", "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    line = _error_line(result)
    assert "org/other is not a model in PURE's layout" in line and "config.json" in line


def test_cli_offline_revision_not_cached_is_named(hub, tiny_pure, tmp_path):
    write_hub_cache(hub, "org/tiny", tiny_pure, files=_model_files(tiny_pure))
    result = _cli("download", "org/tiny@no-such-branch")
    assert result.returncode == 2
    line = _error_line(result)
    assert "org/tiny@no-such-branch" in line and "pure-lite download org/tiny@no-such-branch" in line


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for an unknown revision or a gated repository."""

    answers = {"/api/models/org/tiny/revision/nope": (404, "RevisionNotFound"),
               "/api/models/org/gated/revision/main": (403, "GatedRepo")}

    def do_GET(self):
        status, code = self.answers.get(self.path, (404, "RepoNotFound"))
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(hub):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HUB_OFFLINE": "0"}
    server.shutdown()


def test_cli_revision_the_hub_does_not_have(local_hub):
    result = _cli("download", "org/tiny@nope", env=local_hub)
    assert result.returncode == 2
    assert "org/tiny has no revision 'nope'" in _error_line(result)


def test_cli_gated_repository_without_token(local_hub):
    result = _cli("download", "org/gated", env={**local_hub, "HF_TOKEN": ""})
    assert result.returncode == 2
    line = _error_line(result)
    assert "org/gated is a gated repository" in line and "HF_TOKEN" in line


def test_cli_network_failure(hub):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _cli("download", "org/tiny", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0",
                                               "HF_HUB_ETAG_TIMEOUT": "2"})
    assert result.returncode == 2
    assert "cannot reach the Hugging Face Hub to fetch org/tiny" in _error_line(result)
