import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pure_lite.cli import main


def test_import_does_not_import_torch_or_the_hub_library():
    code = ("import sys, pure_lite, pure_lite.sampling, pure_lite.tokens, pure_lite.images, pure_lite.hub; "
            "print('torch' in sys.modules, 'huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_cli_restores_good_inputs_and_reports_bad(tiny_compact, tmp_path, rgb_image, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(rgb_image).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    before = good.read_bytes()
    out = tmp_path / "out"
    rc = main(["restore", str(bad), str(good), "-o", str(out), "--model", str(tiny_compact),
               "--target-size", "64", "--seed", "0", "--max-text-tokens", "4", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "bad.png" in captured.err and captured.err.count("error:") == 1
    # -q: nothing but the error, not transformers' "Loading weights" bar or load report (issue 34 group 9)
    assert [line for line in captured.err.splitlines() if line.strip()] == [
        line for line in captured.err.splitlines() if line.startswith("error:")], captured.err
    assert Image.open(out / "good_restored.png").size == (64, 64)
    assert not (out / "bad_restored.png").exists()
    assert good.read_bytes() == before


def test_cli_takes_an_int4_kv_cache(tiny_compact, tmp_path, rgb_image, monkeypatch):
    """--kv-cache int4 reaches the torch backend's loader and the restoration is written."""
    from pure_lite.torch_backend import load

    asked = []
    original = load.load_components
    monkeypatch.setattr(load, "load_components", lambda *a, **kw: asked.append(kw["kv_cache"]) or original(*a, **kw))
    src = tmp_path / "photo.png"
    Image.fromarray(rgb_image).save(src)
    rc = main(["restore", str(src), "-o", str(tmp_path / "out.png"), "--model", str(tiny_compact), "--kv-cache",
               "int4", "--target-size", "64", "--max-text-tokens", "4", "-q"])
    assert rc == 0 and asked == ["int4"]
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_cli_never_overwrites_an_input(tiny_compact, tmp_path, rgb_image, capsys):
    src = tmp_path / "photo.png"
    Image.fromarray(rgb_image).save(src)
    before = src.read_bytes()
    rc = main(["restore", str(src), "-o", str(src), "--model", str(tiny_compact), "--target-size", "64", "-q"])
    assert rc == 1 and "refusing to overwrite" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_cli_bad_model_folder(tmp_path, capsys):
    rc = main(["restore", "x.png", "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "none")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_a_built_wheel_ships_the_default_model_and_the_three_layers(tmp_path):
    """What `pip install ./` (not editable, as on a GPU machine) installs: PURE-tiny's files, and export/ and
    runtime/ under the pure_lite package, where `import pure_lite.export` / `.runtime` look for them."""
    pytest.importorskip("setuptools", reason="building a wheel without build isolation needs setuptools")
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # setuptools writes build/ and *.egg-info beside the sources: not into the checkout
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copyfile(root / part, source / part)
    for part in ("pure_lite", "export", "runtime"):
        shutil.copytree(root / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("pure_lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    model = root / "pure_lite" / "models" / "pure_tiny"
    assert {f"pure_lite/models/pure_tiny/{p.name}" for p in model.iterdir()} <= names
    for layer in ("export", "runtime"):
        assert {f"pure_lite/{layer}/{p.name}" for p in (root / layer).glob("*.py")} <= names
    assert not any(n.startswith(("tests/", "export/", "runtime/", "benchmarks/")) for n in names)
