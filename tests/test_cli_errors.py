"""The ``pure-lite`` command as a user runs it, in a subprocess: one ``error:`` line per bad input,
never a traceback, the other inputs still restored, nothing overwritten without --overwrite.

Most runs use the shipped PURE-tiny (an export: no torch, about a second per image)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="PURE-tiny runs on the runtime: install the [runtime] extra")

# Runs main() with some modules made unimportable, as in an install without that extra.
_WITHOUT = "import sys\nfor name in sys.argv.pop(1).split(','):\n    sys.modules[name] = None\n" \
           "from pure_lite.cli import main\nsys.exit(main(sys.argv[1:]))"


def _run(*args: str, without: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", _WITHOUT, without] if without else [sys.executable, "-m", "pure_lite.cli"]
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_each_bad_input_is_one_error_line_and_the_others_are_restored(tmp_path):
    first, second = _photo(tmp_path / "a" / "b.png", 0), _photo(tmp_path / "c" / "b.png", 1)  # same name
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    blocked = _photo(tmp_path / "x.png", 2)
    out = tmp_path / "out"
    (out / "x_restored.png").mkdir(parents=True)  # an output name that is an existing folder
    result = _run("restore", first, garbage, tmp_path / "missing.png", second, blocked, "-o", out, "--seed", "0", "-q")
    errors = _errors(result)
    assert result.returncode == 1
    assert len(errors) == 3, result.stderr
    assert [e for e in errors if "garbage.png" in e] and [e for e in errors if "missing.png" in e]
    assert [e for e in errors if "x_restored.png" in e and "already exists" in e]
    a, c = out / "b_restored.png", out / "b_2_restored.png"  # both kept: neither overwrote the other
    assert Image.open(a).size == Image.open(c).size == (128, 128)
    assert a.read_bytes() != c.read_bytes()
    assert result.stdout == ""  # -q: errors only

    # With --overwrite the folder still cannot be replaced by a file: reported while writing.
    before = a.stat().st_mtime_ns
    result = _run("restore", first, blocked, "-o", out, "--seed", "0", "-q", "--overwrite")
    errors = _errors(result)
    assert result.returncode == 1 and len(errors) == 1 and "x.png" in errors[0] and "x_restored.png" in errors[0]
    assert a.stat().st_mtime_ns != before


def test_unwritable_outputs_are_reported_per_input(tmp_path):
    photos = [_photo(tmp_path / "p1.png", 0), _photo(tmp_path / "p2.png", 1)]
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    result = _run("restore", *photos, "-o", a_file / "out", "-q")
    errors = _errors(result)
    assert result.returncode == 1 and len(errors) == 2, result.stderr
    assert all("is a file, not a folder" in e for e in errors)
    assert "p1.png" in errors[0] and "p2.png" in errors[1]
    if Path("/proc/self").is_dir():  # a folder nobody can create files in
        result = _run("restore", photos[0], "-o", "/proc/restored.png", "-q")
        errors = _errors(result)
        assert result.returncode == 1 and len(errors) == 1 and "/proc/restored.png" in errors[0]


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    photo = _photo(tmp_path / "p.png", 0)
    out = tmp_path / "restored.png"
    out.write_bytes(b"precious")
    result = _run("restore", photo, "-o", out, "-q")
    errors = _errors(result)
    assert result.returncode == 1 and len(errors) == 1 and "--overwrite" in errors[0]
    assert out.read_bytes() == b"precious"
    assert _run("restore", photo, "-o", out, "-q", "--overwrite").returncode == 0
    assert Image.open(out).size == (128, 128)


def test_one_input_and_an_output_without_suffix_is_a_png_file(tmp_path):
    photo = _photo(tmp_path / "p.png", 0)
    result = _run("restore", photo, "-o", tmp_path / "noext", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "noext").is_file() and Image.open(tmp_path / "noext").format == "PNG"
    assert "PURE-tiny" in result.stderr and "p.png ->" in result.stdout  # not quiet: notice and report
    result = _run("restore", photo, "-o", f"{tmp_path / 'folder'}/", "-q")  # a trailing slash: a folder
    assert result.returncode == 0 and (tmp_path / "folder" / "p_restored.png").is_file()


def test_argument_errors_come_before_the_notice(tmp_path):
    photo = _photo(tmp_path / "p.png", 0)
    result = _run("restore", photo, "-o", tmp_path / "o.png", "--target-size", "100")
    assert result.returncode == 2 and "multiple of 32" in result.stderr
    assert "PURE-tiny" not in result.stderr and not (tmp_path / "o.png").exists()


def test_version():
    from pure_lite import __version__

    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pure-lite {__version__}"


def test_a_missing_model_folder_is_reported_without_torch(tmp_path):
    photo = _photo(tmp_path / "p.png", 0)
    result = _run("restore", photo, "-o", tmp_path / "o.png", "--model", "/no/such/path", without="torch")
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "/no/such/path does not exist" in errors[0]


def test_a_checkpoint_without_torch_names_the_extra(tiny_compact, tmp_path):
    photo = _photo(tmp_path / "p.png", 0)
    result = _run("restore", photo, "-o", tmp_path / "o.png", "--model", tiny_compact, without="torch")
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "pure-lite[torch]" in errors[0], result.stderr


def test_quantize_is_one_error_line_where_it_cannot_apply(tiny_compact, tmp_path):
    """--quantize / --kv-cache on an export (the default model) or int4 on a CPU: one error line, nothing written."""
    photo = _photo(tmp_path / "p.png", 0)
    for extra, message in ((["--quantize", "int4"], "is an export, served by ONNX Runtime"),
                           (["--kv-cache", "int8"], "--kv-cache int8 applies to a checkpoint folder"),
                           (["--quantize", "int4", "--model", tiny_compact], "needs a CUDA device")):
        result = _run("restore", photo, "-o", tmp_path / "o.png", *extra)
        errors = _errors(result)
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
        assert not (tmp_path / "o.png").exists()


def test_eval_without_opencv_names_the_extra(tmp_path):
    _photo(tmp_path / "photos" / "p.png", 0)
    result = _run("eval", "--images", tmp_path / "photos", "-o", tmp_path / "report", without="cv2")
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "pure-lite[eval]" in errors[0], result.stderr
    assert not (tmp_path / "report.json").exists()


def test_device_picks_the_export_provider(tmp_path):
    import onnxruntime

    photo = _photo(tmp_path / "p.png", 0)
    assert _run("restore", photo, "-o", tmp_path / "cpu.png", "--device", "cpu", "-q").returncode == 0
    result = _run("restore", photo, "-o", tmp_path / "mps.png", "--device", "mps", "-q")
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "cpu or cuda" in errors[0]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        result = _run("restore", photo, "-o", tmp_path / "cuda.png", "--device", "cuda", "-q")
        errors = _errors(result)
        assert result.returncode == 2 and len(errors) == 1 and "pure-lite[gpu]" in errors[0]
        assert not (tmp_path / "cuda.png").exists()


def test_every_option_has_help():
    import argparse

    from pure_lite.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, sub in subcommands.choices.items() for action in sub._actions
               if not action.help]
    assert missing == []


def test_export_shows_a_bar_and_a_summary_not_the_libraries_logs(cli_export_compact_int8, tiny_compact):
    from pure_lite.atomic import plain_file_mode, plain_folder_mode
    from pure_lite.manifest import Manifest

    result, out = cli_export_compact_int8  # `pure-lite export COPY -o OUT --quant int8 --block-size 32`
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"exported {out}: ") and len(result.stdout.splitlines()) == 1
    for noise in ("onnx_ir", "Warning", "torchvision", "Loading weights", "[torch.onnx]"):
        assert noise not in result.stderr + result.stdout, noise
    # off a terminal the stage bar is one line per stage, named, in order (on one, a bar: test_progress.py)
    stages = result.stderr.splitlines()
    assert [line[:5] for line in stages] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], result.stderr
    assert "streaming" in stages[1] and "manifest" in stages[3]
    assert Manifest.load(out).quantization == "int8"
    assert Manifest.load(out).model["image_size"] == 64  # what the checkpoint records, with no --image-size
    # readable by others as a plain mkdir/open would make it (0755/0644 under umask 022), not 0700/0600
    assert (out.stat().st_mode & 0o777) == plain_folder_mode()
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {plain_file_mode()}
    # A failure is one error line, and the folder is left alone.
    again = _run("export", tiny_compact, "-o", out)
    errors = _errors(again)
    assert again.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0]
    assert Manifest.load(out).quantization == "int8"


def test_train_vq_with_a_perceptual_loss_but_no_weights_says_how_to_make_them(tmp_path):
    pytest.importorskip("torch")
    import os

    _photo(tmp_path / "photos" / "a.png", 0)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-m", "pure_lite.cli", "train-vq", str(tmp_path / "photos"), "-o",
                             str(tmp_path / "vq"), "--crop", "32", "--steps", "1", "--perceptual-weight", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "convert-lpips --net vgg16" in errors[0], result.stderr
    assert not (tmp_path / "vq").exists()


def test_restore_keeps_alpha_grey_sixteen_bits_and_the_profile_and_turns_phone_photos_upright(tmp_path):
    """Issue 38 and issue 34 group 8 through the command line: 16x12 inputs, one PURE-tiny tile each."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(0)
    rgba = Image.fromarray((rng.random((12, 16, 4)) * 255).astype(np.uint8), mode="RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter, as a phone does: upright it is 16 wide, 12 tall
    rgba.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", icc_profile=icc, exif=exif)
    ramp = (30000 + 8 * np.arange(12 * 16).reshape(12, 16)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    result = _run("restore", tmp_path / "phone.png", tmp_path / "grey16.png", "-o", f"{tmp_path / 'out'}/",
                  "--seed", "0", "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    phone = Image.open(tmp_path / "out" / "phone_restored.png")
    assert phone.mode == "RGBA" and phone.size == (64, 48) and phone.info.get("icc_profile") == icc
    alpha = np.asarray(phone)[..., 3].astype(np.float32)
    expected = np.asarray(rgba.getchannel("A").resize((64, 48), Image.BICUBIC), np.float32)
    assert np.abs(alpha - expected).mean() < 2  # the input's alpha, upscaled, upright
    grey = Image.open(tmp_path / "out" / "grey16_restored.png")
    assert grey.mode == "I;16" and grey.size == (64, 48)
    assert len(np.unique(np.asarray(grey))) > 256  # more levels than 8 bits hold
    assert abs(float(np.asarray(grey, np.float64).mean()) - float(ramp.mean())) < 2000


def test_output_problems_are_reported_before_the_input_is_read(tmp_path):
    """An unknown extension, --quality for a lossless output, an unwritable folder: each one error line about the
    output, although the input is corrupt (so no restoration was tried); a folder input points to restore-many."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cases = [(corrupt, tmp_path / "x.xyz", [], "use .png"), (corrupt, tmp_path / "x.png", ["--quality", "50"], "lossy")]
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, root included
        cases.append((corrupt, Path("/proc/x.png"), [], "is not writable"))
    cases.append((tmp_path, tmp_path / "y.png", [], "restore-many"))
    for src, out, extra, message in cases:
        result = _run("restore", src, "-o", out, *extra, "-q")
        errors = _errors(result)
        assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr
        assert "not a readable image" not in errors[0] and not out.exists()


def test_python_warnings_are_one_line():
    """A RuntimeWarning raised during a command is one 'warning:' line, not a file, line number and source line."""
    code = ("import sys, warnings\nfrom pure_lite import cli\n"
            "def restore(args):\n    warnings.warn('overflow encountered\\n in exp', RuntimeWarning)\n    return 0\n"
            "cli._restore = restore\nsys.exit(cli.main(['restore', 'x.png', '-o', 'y.png']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "warning: RuntimeWarning: overflow encountered in exp\n"


def test_export_without_torch_names_the_export_extra_in_one_line(tmp_path):
    result = _run("export", tmp_path, "-o", tmp_path / "out", without="torch")  # as in a [runtime] install
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and result.stderr.strip() == errors[0]
    assert "export needs torch" in errors[0] and "pure-lite[export]" in errors[0]
    assert not (tmp_path / "out").exists()
