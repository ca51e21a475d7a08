"""Hostile and broken checkpoint folders (issue 34): each is one typed error, naming the file and the field.

Every case is a copy of the tiny checkpoint with one thing altered. The command-line cases run in one
subprocess (``_DRIVER``) that calls the CLI's ``main`` once per case, under a time limit and an address
space limit, with an audit hook recording any open of a file under a watched folder: each case must
end with exit status 2 and exactly one ``error:`` line, never an exception escaping ``main``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure_lite.checkpoint import IMAGE_SIZE_KEY, CheckpointFiles
from pure_lite.errors import CheckpointError
from pure_lite.model_files import allowed_roots
from pure_lite.safetensors_header import read_header
from pure_lite.tokens import read_tokenizer_vocab

_DRIVER = r"""
import contextlib, io, json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))  # a runaway allocation fails instead of swapping
cases, watched = json.loads(sys.argv[1]), os.path.realpath(sys.argv[2])
opened = []

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path == watched or path.startswith(watched + os.sep):
            opened.append(path)

sys.addaudithook(audit)
from pure_lite.cli import main

results = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except BaseException as exc:
            status = f"escaped: {type(exc).__name__}: {exc}"
    results.append({"status": status, "stderr": err.getvalue()})
print(json.dumps({"results": results, "opened": opened}))
"""


def _run_cli_cases(cases: list[list[str]], watched: Path, timeout: int = 240) -> tuple[list[dict], list[str]]:
    result = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases), str(watched)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    return out["results"], out["opened"]


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _set_config(**changes):
    def alter(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps({**_config(folder), **changes}))
    return alter


def _write(name: str, text: str):
    def alter(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).write_text(text)
    return alter


def _huge(name: str, size: int):
    """A sparse file of ``size`` bytes under ``name``: costs no disk, would cost ``size`` of memory to read."""
    def alter(folder: Path) -> None:
        (folder / name).unlink()
        with open(folder / name, "wb") as f:
            f.truncate(size)
    return alter


def _fifo(name: str):
    def alter(folder: Path) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return alter


def _tokenizer(change):
    def alter(folder: Path) -> None:
        data = json.loads((folder / "tokenizer.json").read_text())
        change(data)
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return alter


def _weights_bytes(change):
    """Rewrite model.safetensors' bytes: ``change(header: dict, data: bytes) -> (header, data)``; the header
    length is recomputed unless ``change`` returns bytes for the whole file."""
    def alter(folder: Path) -> None:
        path = folder / "model.safetensors"
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        out = change(json.loads(raw[8:8 + n]), raw[8 + n:])
        if isinstance(out, bytes):
            path.write_bytes(out)
            return
        header = json.dumps(out[0]).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + out[1])
    return alter


def _first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _lie_about_shape(header, data):
    name = _first_tensor(header)
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    return header, data


def _overlap(header, data):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = [o - 4 for o in header[names[1]]["data_offsets"]]
    return header, data


def _header_longer_than_file(header, data):
    text = json.dumps(header).encode()
    return (len(text) + 10 ** 9).to_bytes(8, "little") + text + data


def _outside_link(name: str):
    def alter(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).symlink_to(folder.parent / "outside" / name)
    return alter


def _renamed_weights_beside_a_pickle(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not read: pure-lite never unpickles the language model")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# case -> (how to break a copy of the checkpoint, the file named in the error, text the error must hold)
CASES = {
    "a million layers": (_set_config(num_hidden_layers=10 ** 6), "config.json", "num_hidden_layers"),
    "vocab_size 1e12": (_set_config(vocab_size=10 ** 12), "config.json", "vocab_size"),
    "zero heads": (_set_config(num_attention_heads=0), "config.json", "num_attention_heads"),
    "heads not dividing": (_set_config(num_attention_heads=3), "config.json", "num_attention_heads 3"),
    "kv heads not dividing": (_set_config(num_key_value_heads=3), "config.json", "num_key_value_heads"),
    "more layers than weights": (_set_config(num_hidden_layers=3), "config.json", "num_hidden_layers is 3"),
    "vocab disagrees with weights": (_set_config(vocab_size=600), "config.json", "vocab_size"),
    "image size 1e6": (_set_config(**{IMAGE_SIZE_KEY: 10 ** 6}), "config.json", IMAGE_SIZE_KEY),
    "config is a list": (_write("config.json", "[]"), "config.json", "JSON object"),
    "config nested deeply": (_write("config.json", _nested(100_000)), "config.json", "nested too deeply"),
    "config of 50 MB": (_huge("config.json", 50 << 20), "config.json", "more than"),
    "config is a FIFO": (_fifo("config.json"), "config.json", "not a regular file"),
    "tokenizer of 300 MB": (_huge("tokenizer.json", 300 << 20), "tokenizer.json", "more than"),
    "tokenizer nested deeply": (_write("tokenizer.json", _nested(100_000)), "tokenizer.json", "nested too deeply"),
    "tokenizer is a FIFO": (_fifo("tokenizer.json"), "tokenizer.json", "not a regular file"),
    "added token without id": (_tokenizer(lambda d: d["added_tokens"][0].pop("id")), "tokenizer.json",
                               "added_tokens[0]"),
    "added_tokens not a list": (_tokenizer(lambda d: d.update(added_tokens={"a": 1})), "tokenizer.json",
                                "'added_tokens' must be a list"),
    "token id 1e12": (_tokenizer(lambda d: d["added_tokens"][0].update(id=10 ** 12)), "tokenizer.json",
                      "not an integer in"),
    "VQ weights are a FIFO": (_fifo("vq_ds8_c2i.pt"), "vq_ds8_c2i.pt", "not a regular file"),
    "truncated weights": (_weights_bytes(lambda h, d: (h, d[:-100])), "model.safetensors", "truncated"),
    "a shape that lies": (_weights_bytes(_lie_about_shape), "model.safetensors", "needs"),
    "overlapping tensors": (_weights_bytes(_overlap), "model.safetensors", "overlapping"),
    "header longer than the file": (_weights_bytes(_header_longer_than_file), "model.safetensors", "truncated"),
    "weights are a FIFO": (_fifo("model.safetensors"), "model.safetensors", "not a regular file"),
    "only a pickle": (_renamed_weights_beside_a_pickle, "", "missing model.safetensors"),
    "tokenizer links outside": (_outside_link("tokenizer.json"), "tokenizer.json", "outside the folder"),
    "weights link outside": (_outside_link("model.safetensors"), "model.safetensors", "outside the folder"),
    "config links outside": (_outside_link("config.json"), "config.json", "outside the folder"),
}


def _copy(source: Path, folder: Path) -> None:
    """A copy whose large VQ file is a hard link (never written: the cases replace files, not rewrite them)."""
    shutil.copytree(source, folder, copy_function=lambda a, b: os.link(a, b) if a.endswith(".pt") else shutil.copy2(a, b))


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_each_broken_checkpoint_is_one_error_line_exit_2(tiny_compact, tmp_path, photo):
    """Run by the command line, each case stops with exit 2 and one ``error:`` line naming the file (and the
    field), without reading past what it refuses: nothing outside the folder is opened, no pickle is read."""
    shutil.copytree(tiny_compact, tmp_path / "outside")  # genuine copies, so a followed link would load
    cases, folders = [], []
    for i, (alter, _, _) in enumerate(CASES.values()):
        folder = tmp_path / f"case{i}"
        _copy(tiny_compact, folder)
        alter(folder)
        folders.append(folder)
        cases.append(["restore", str(photo), "-o", str(tmp_path / f"out{i}.png"), "--model", str(folder), "-q"])
    results, opened = _run_cli_cases(cases, tmp_path / "outside")
    assert opened == []
    for (case, (_, name, message)), folder, result in zip(CASES.items(), folders, results):
        errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
        assert result["status"] == 2, (case, result)
        assert len(errors) == 1 and message in errors[0] and str(folder / name) in errors[0], (case, result)
        assert "Traceback" not in result["stderr"], (case, result)
    assert not any((tmp_path / f"out{i}.png").exists() for i in range(len(cases)))


_WATCHED: list[tuple[Path, list]] = []  # (path that must not be opened, where opens of it are recorded)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            target = Path(os.fsdecode(args[0])).resolve()
        except (OSError, RuntimeError, ValueError):
            return
        for path, opened in _WATCHED:
            if target == path or path in target.parents:
                opened.append(str(target))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _WATCHED is not empty


def test_a_pickle_beside_the_safetensors_is_never_opened(tiny_compact, tmp_path):
    """transformers falls back to pytorch_model.bin when it finds no safetensors under its own names;
    pure-lite loads with use_safetensors=True, so the pickle beside real weights is never opened."""
    from pure_lite.restorer import Restorer

    folder = tmp_path / "model"
    _copy(tiny_compact, folder)
    (folder / "pytorch_model.bin").write_bytes(b"would be unpickled")
    opened: list = []
    _WATCHED.append(((folder / "pytorch_model.bin").resolve(), opened))
    try:
        Restorer.from_pretrained(folder)
    finally:
        _WATCHED.clear()
    assert opened == []


def test_the_config_is_checked_before_any_weight_is_read(tiny_compact, tmp_path):
    folder = tmp_path / "model"
    _copy(tiny_compact, folder)
    _set_config(num_hidden_layers=10 ** 9)(folder)
    with pytest.raises(CheckpointError, match=r"config.json: num_hidden_layers is 1000000000, outside"):
        CheckpointFiles.locate(folder).read_config()
    assert CheckpointFiles.locate(tiny_compact).check_language_model()["num_hidden_layers"] == 2


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "does not account"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "a hole"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlapping"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "begin, end"),
    ({"a": [1, 2]}, b"", "not an object"),
], ids=["valid", "shape", "trailing", "hole", "overlap", "dtype", "negative", "reversed", "entry"])
def test_safetensors_headers_are_checked_against_the_file(tmp_path, header, data, message):
    path = _safetensors(tmp_path / "w.safetensors", header, data)
    if message is None:
        assert read_header(path) == {"a": ("F32", (2,), 8 + len(json.dumps(header).encode()))}
        return
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_a_truncated_or_bottomless_safetensors_file_is_refused(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="shorter than"):
        read_header(tmp_path / "short.safetensors")
    nested = tmp_path / "nested.safetensors"
    text = _nested(100_000).encode()
    nested.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_header(nested)


def test_added_tokens_are_checked(tmp_path, tiny_compact):
    data = json.loads((tiny_compact / "tokenizer.json").read_text())
    for added, message in [([{"content": "x"}], r"added_tokens\[0\]"), ([7], r"added_tokens\[0\]"),
                           ([{"content": "x", "id": "7"}], "has id '7'"), ([{"content": "x", "id": -1}], "has id -1"),
                           ("abc", "must be a list")]:
        (tmp_path / "tokenizer.json").write_text(json.dumps({**data, "added_tokens": added}))
        with pytest.raises(CheckpointError, match=message):
            read_tokenizer_vocab(tmp_path / "tokenizer.json")


def _hub_snapshot(source: Path, hub: Path, repo: str = "models--org--name") -> Path:
    """``source`` laid out as the Hugging Face cache does: files in blobs/, the snapshot made of links to them."""
    blobs, snapshot = hub / repo / "blobs", hub / repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(source.iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snapshot


def test_a_hugging_face_cache_snapshot_may_link_into_its_own_blobs(tiny_compact, tmp_path):
    from pure_lite.restorer import Restorer

    snapshot = _hub_snapshot(tiny_compact, tmp_path / "hub")
    assert allowed_roots(snapshot) == (snapshot.resolve(), (tmp_path / "hub" / "models--org--name" / "blobs").resolve())
    restorer = Restorer.from_pretrained(snapshot)
    assert restorer.components.layout.codebook_size == 256

    other = _hub_snapshot(tiny_compact, tmp_path / "hub", "models--someone--else")  # another repository's blobs
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(Path("../../../models--someone--else/blobs") /
                                             os.readlink(other / "tokenizer.json").split("/")[-1])
    with pytest.raises(CheckpointError, match="tokenizer.json: refused: it resolves to .*outside the folder"):
        Restorer.from_pretrained(snapshot)


def test_a_folder_that_merely_looks_like_a_snapshot_gets_no_blobs(tmp_path):
    plain = tmp_path / "snapshots" / "abc"
    plain.mkdir(parents=True)
    assert allowed_roots(plain) == (plain.resolve(),)


FAST_SAMPLING = dict(max_text_tokens=6)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_threads_sharing_one_restorer_get_the_single_threaded_images(tiny_compact, backend):
    """Several threads on one Restorer give exactly the images one thread gives for the same seeds (the torch
    backend serializes its calls, the runtime gives each its own decoder)."""
    from pure_lite.restorer import Restorer
    from pure_lite.sampling import SamplingConfig

    restorer = Restorer.from_pretrained(tiny_compact if backend == "torch" else None)
    assert restorer.components.shares_decoder == (backend == "torch")
    sampling = SamplingConfig(**FAST_SAMPLING)
    photos = [(np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8) for i in range(3)]

    def restore(i: int) -> np.ndarray:
        return np.asarray(restorer.restore(photos[i], seed=i, target_size=32, sampling=sampling).image)

    alone = [restore(i) for i in range(3)]
    together: dict[int, np.ndarray] = {}
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            together[i] = restore(i)
        except BaseException as exc:  # reported below, with the thread's case
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and failures == []
    assert all(np.array_equal(together[i], alone[i]) for i in range(3))
    assert len({a.tobytes() for a in alone}) > 1  # the photos and seeds give different images


def test_sampling_must_be_a_sampling_config_with_sane_numbers():
    from pure_lite.restorer import Restorer
    from pure_lite.sampling import SamplingConfig

    for bad in (1e300, -1e300, float("nan"), 101):
        with pytest.raises(ValueError, match="cfg_scale must be a number between"):
            SamplingConfig(cfg_scale=bad)
    with pytest.raises(TypeError, match="k_max must be an integer"):
        SamplingConfig(k_max=2.5)
    restorer = Restorer.from_pretrained(None)
    with pytest.raises(TypeError, match=r"sampling must be a SamplingConfig, got dict; .*SamplingConfig\(\*\*d\)"):
        restorer.restore(np.zeros((16, 16, 3), np.uint8), sampling={"cfg_scale": 1.0})
