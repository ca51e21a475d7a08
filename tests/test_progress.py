"""What a user sees during long work (issue 38): the plan before decoding, progress in whole tiles with a
time left, a bounded number of lines off a terminal, restore-many's tiles over all workers, the export's
stage bar; and the limits of what a model was trained for (scale, target size), said before any work.

The command-line runs use the shipped PURE-tiny on inputs of a few tiles (a second or two each on a quiet
machine), in subprocesses whose stderr is a pipe, not a terminal."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure_lite.console import LINE_STEPS, StageBar, TileProgress, duration

pytest.importorskip("onnxruntime", reason="PURE-tiny runs on the runtime: install the [runtime] extra")

ROOT = Path(__file__).resolve().parents[1]
_PROGRESS = re.compile(r"^(\S+): (\d+)/(\d+) tiles \((\d+)%\), ([^,]+)(, about (.+) left)?$")


def _run(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pure_lite.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return path


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_a_bounded_number_of_lines_in_whole_tiles():
    stream = io.StringIO()
    shown = TileProgress("big.png", stream)
    for done in range(0, 1001):  # a long restoration reported tile by tile, some counts more than once
        shown(done, 1000)
        shown(done, 1000)
    shown.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == LINE_STEPS + 1  # 0%, 10%, ..., 100%: however many tiles
    parsed = [_PROGRESS.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m[2]) for m in parsed] == list(range(0, 1001, 100))
    # no estimate before a tile is done, one after, none once all are done
    assert parsed[0][6] is None and all(m[6] for m in parsed[1:-1]) and parsed[-1][6] is None


def test_on_a_terminal_progress_redraws_one_line():
    stream = _Terminal()
    shown = TileProgress("photo.png", stream)
    shown(0, 3)
    shown(3, 3)  # the end is always drawn
    shown.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 2
    assert "photo.png: 3/3 tiles (100%)" in text


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.4, 65, 459, 3 * 3600 + 5 * 60)] == ["4 s", "1 min 05 s", "7 min 39 s", "3 h 05 min"]


def test_the_stage_bar_shows_the_stage_and_moves_on_a_terminal():
    stream = _Terminal()
    with StageBar(stream) as bar:
        bar("[2/4] streaming 40 tensors (0.01 GB) into the graphs' data files (int8)")
        assert (bar.bar.n, bar.bar.total) == (1, 4) and bar.bar.desc.startswith("streaming 40 tensors")
        bar("3/40 tensors")
        assert bar.bar.postfix == "3/40 tensors"
        bar("[4/4] writing the manifest")
        assert bar.bar.n == 3 and bar.bar.desc.startswith("writing the manifest")


def test_restore_prints_its_plan_before_decoding_and_whole_tile_progress(tmp_path):
    src = _photo(tmp_path / "wide.png", 64, 32)  # x4: 256x128, three 128-px tiles
    result = _run("restore", src, "-o", tmp_path / "out.png", "--seed", "0", "--tile-batch", "1")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("using PURE-tiny")]
    assert lines[0] == (f"{src}: 64x32 -> 256x128, x4 in 3 tiles of 128 px, 1 at a time; "
                        "the time left shows once decoding has given a rate")
    progress = [_PROGRESS.match(line) for line in lines[1:]]
    assert all(progress), lines
    counts = [(int(m[2]), int(m[3])) for m in progress]  # whole tiles, a line per tenth of the work at most
    assert counts[0] == (0, 3) and counts[-1] == (3, 3) and {1, 2} <= {done for done, _ in counts}
    assert counts == sorted(counts) and len(counts) <= 11
    assert [int(m[4]) for m in progress] == sorted(int(m[4]) for m in progress)  # percent of the work, rising
    assert progress[1][7] is not None  # a time left as soon as decoding has given a rate
    assert "\r" not in result.stderr


def test_a_scale_below_the_models_factor_warns_once_and_a_larger_target_size_is_refused(tmp_path):
    from pure_lite import Restorer

    inputs = [_photo(tmp_path / f"{i}.png", 32, 32, seed=i) for i in range(2)]
    result = _run("restore", *inputs, "-o", tmp_path / "out/", "--scale", "2", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("below the x4 this model was trained for") == 1, result.stderr
    assert "trained for" in _run("restore", "--help").stdout
    refused = _run("restore", inputs[0], "-o", tmp_path / "big.png", "--target-size", "256")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --target-size 256 is above the 128x128 squares")
    assert not (tmp_path / "big.png").exists()
    restorer = Restorer.from_pretrained()
    assert restorer.components.trained_scale == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # x4 and a plan alone warn of nothing
        assert len(restorer.plan(inputs[0], scale=4).boxes) == 1
    with pytest.raises(ValueError, match="target_size 256 is above"):
        restorer.plan(inputs[0], target_size=256)


def test_the_example_tiny_model_restores_at_a_small_side(tmp_path):
    pytest.importorskip("torch")
    from pure_lite import Restorer, SamplingConfig

    out = tmp_path / "tiny"
    made = subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_model.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert json.loads((out / "config.json").read_text())["pure_lite_image_size"] == 128
    restorer = Restorer.from_pretrained(out)
    assert restorer.components.image_size == 128
    assert len(restorer.plan(ROOT / "examples" / "images" / "photo.png").boxes) == 12  # as PURE-tiny tiles it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "beyond the positions the model was trained at"
        result = restorer.restore(np.zeros((32, 32, 3), np.uint8), seed=0,
                                  sampling=SamplingConfig(max_text_tokens=2))
    assert result.image.size == (128, 128)
