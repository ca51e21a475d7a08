"""restore-many: a folder on Ray workers, resumable, nothing lost (pure_lite/batch.py, pure_lite/journal.py).

The runs use PURE-tiny (the shipped default, about 1-4 s per 32x32 image here) on a local Ray
with 2 CPUs that this module starts once; one test starts its own Ray in a subprocess to be
interrupted like a terminal's Ctrl-C.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure_lite import batch
from pure_lite.batch import BatchConfig, image_seed, restore_many
from pure_lite.cli import main
from pure_lite.errors import OutputError, PureLiteError
from pure_lite.journal import JOURNAL_FILE, Entry, Journal, JournalError, read_journal

ray = pytest.importorskip("ray", reason="restore-many runs on Ray: install the [ray] extra")
pytest.importorskip("onnxruntime", reason="PURE-tiny runs on the runtime: install the [runtime] extra")

GOOD = [f"img{i:02d}.png" for i in range(9)] + ["sub/img09.jpg", "dup.png", "dup.jpg"]
CORRUPT = "corrupt.png"


def _write_photos(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / name)


def _output(name: str) -> str:
    return {"dup.png": "dup_png_restored.png"}.get(name, name.rsplit(".", 1)[0] + "_restored.png")


def _run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["restore-many", *args, "-q"])
    return rc, out.getvalue(), err.getvalue()


def _journal_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL_FILE).read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def local_ray():
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory):
    """The issue's proof run: 12 good images and a corrupt one, 2 workers, through the command line."""
    root = tmp_path_factory.mktemp("collection")
    photos = root / "photos"
    _write_photos(photos, GOOD)
    (photos / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder can use")
    (photos / "notes.txt").write_text("not an image: ignored")
    out = root / "restored"
    rc, stdout, stderr = _run_cli(str(photos), "-o", str(out), "--workers", "2")
    return photos, out, rc, stdout, stderr


def test_all_good_images_restored_and_the_corrupt_one_recorded_with_its_reason(first_run):
    photos, out, rc, stdout, stderr = first_run
    assert rc == 1  # an input failed
    for name in GOOD:
        assert Image.open(out / _output(name)).size == (128, 128), name
    header, entries = read_journal(out)
    assert set(entries) == set(GOOD) | {CORRUPT}
    assert all(entries[n].status == "done" for n in GOOD)
    assert entries[CORRUPT].status == "failed" and "not a readable image" in entries[CORRUPT].error
    assert f"error: {entries[CORRUPT].error}" in stderr and "Traceback" not in stderr
    assert "12 done" in stdout and "1 failed" in stdout
    report = json.loads((out / "restore-many-report.json").read_text())
    assert report["summary"]["done"] == 12 and report["summary"]["restored_by_this_run"] == 12
    by_name = {r["input"]: r for r in report["images"]}
    for name in GOOD:
        r = by_name[name]
        assert r["output"] == _output(name) and r["seconds"] > 0 and "noise" in r["degradation"]
    assert by_name[CORRUPT]["output"] is None and by_name[CORRUPT]["error"] == entries[CORRUPT].error
    assert not list(out.rglob("*.tmp")) and (photos / CORRUPT).exists()


def test_an_output_does_not_depend_on_the_worker_that_made_it(first_run):
    """Parity: the worker's PNG equals an in-process restore with the image's derived seed (same ONNX graphs, CPU)."""
    from pure_lite import Restorer

    photos, out, *_ = first_run
    restorer = Restorer.from_pretrained()
    for name in ("img00.png", "sub/img09.jpg"):
        expected = np.asarray(restorer.restore(photos / name, seed=image_seed(0, name)).image)
        np.testing.assert_array_equal(np.asarray(Image.open(out / _output(name)).convert("RGB")), expected)


def test_rerun_does_nothing_and_never_starts_ray(first_run, tmp_path, monkeypatch):
    photos, out, *_ = first_run
    again = tmp_path / "restored"
    shutil.copytree(out, again)
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*.png")}

    def no_ray():
        raise AssertionError("a rerun with nothing to do must not start Ray")

    monkeypatch.setattr(batch, "_ray", no_ray)
    rc, stdout, stderr = _run_cli(str(photos), "-o", str(again), "--workers", "2")
    assert rc == 1  # the corrupt input is still failed: not retried unless asked
    assert "restored 0" in stdout and "12 done (12 by earlier runs)" in stdout
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*.png")} == before
    assert read_journal(again)[1][CORRUPT].attempts == 1


def test_retry_failed_retries_only_the_failed_input(first_run, tmp_path):
    photos, out, *_ = first_run
    again = tmp_path / "restored"
    shutil.copytree(out, again)
    rc, stdout, _ = _run_cli(str(photos), "-o", str(again), "--workers", "1", "--retry-failed")
    assert rc == 1 and "restored 0" in stdout
    entries = read_journal(again)[1]
    assert entries[CORRUPT].status == "failed" and entries[CORRUPT].attempts == 2
    assert all(entries[n].attempts == 1 for n in GOOD)


def test_output_written_before_a_kill_is_recovered_and_a_foreign_file_is_never_overwritten(first_run, tmp_path,
                                                                                           monkeypatch):
    photos, out, *_ = first_run
    again = tmp_path / "restored"
    shutil.copytree(out, again)
    # The driver died between writing img01's output and its journal line: the journal says pending.
    with Journal(again, read_journal(again)[0]["settings"]) as journal:
        entries = dict(journal.entries)
        entries["img01.png"] = Entry("img01.png", "pending", entries["img01.png"].input_sha256, _output("img01.png"))
        journal.rewrite(entries.values())
    # A file of the user's where img02's output goes (its journal entry lost): it must survive.
    (again / JOURNAL_FILE).write_text("\n".join(
        line for line in (again / JOURNAL_FILE).read_text().splitlines() if '"name": "img02.png"' not in line) + "\n")
    (again / _output("img02.png")).write_bytes(b"the user's own file")
    monkeypatch.setattr(batch, "_ray", lambda: pytest.fail("nothing here needs a worker"))
    rc, stdout, stderr = _run_cli(str(photos), "-o", str(again))
    entries = read_journal(again)[1]
    assert entries["img01.png"].status == "done" and "noise" in entries["img01.png"].degradation
    assert entries["img02.png"].status == "failed" and "never overwritten" in entries["img02.png"].error
    assert (again / _output("img02.png")).read_bytes() == b"the user's own file"
    assert rc == 1 and "restored 0" in stdout


def test_other_settings_are_refused_in_the_same_output_folder(first_run):
    photos, out, *_ = first_run
    rc, _, stderr = _run_cli(str(photos), "-o", str(out), "--seed", "1")
    assert rc == 2 and "other settings (seed differ)" in stderr


def test_a_worker_killed_mid_image_has_its_image_retried_elsewhere(local_ray, tmp_path):
    names = [f"k{i}.png" for i in range(5)]
    _write_photos(tmp_path / "in", names, seed=1)
    dispatched = []

    def kill_third(name, worker):
        dispatched.append((name, worker.pid))
        if len(dispatched) == 3:
            time.sleep(0.5)  # let it start restoring
            os.kill(worker.pid, signal.SIGKILL)

    report = restore_many(tmp_path / "in", tmp_path / "out", config=BatchConfig(workers=2), progress=False,
                          on_dispatch=kill_third)
    assert report.count("done") == 5 and report.restored == 5
    victim, victim_pid = dispatched[2]
    retries = [pid for name, pid in dispatched if name == victim]
    assert len(retries) == 2 and retries[1] != victim_pid  # taken again, by another worker process
    assert {e.name: e.attempts for e in report.entries}[victim] == 2
    done_lines = [r["name"] for r in _journal_lines(tmp_path / "out") if r["status"] == "done"]
    assert sorted(done_lines) == sorted(names)  # every image done exactly once
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(_output(n) for n in names)


def test_ctrl_c_leaves_a_journal_from_which_the_rerun_resumes(local_ray, tmp_path):
    names = [f"c{i}.png" for i in range(5)]
    _write_photos(tmp_path / "in", names, seed=2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pure_lite.cli", "restore-many", str(tmp_path / "in"), "-o", str(out),
           "--workers", "1", "-q"]
    # Its own session, so that SIGINT reaches the whole group as a terminal's Ctrl-C does (Ray's processes too).
    # A shell starts background jobs with SIGINT ignored, and exec keeps an ignored signal ignored: a suite run
    # in the background would start a command that Ctrl-C cannot stop. A handler is not inherited (exec resets
    # it to the default), so one is set here while the child starts.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / JOURNAL_FILE).exists() and '"status": "done"' in (out / JOURNAL_FILE).read_text():
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command to resume" in stderr and "Traceback" not in stderr
    entries = read_journal(out)[1]
    done_before = {n for n, e in entries.items() if e.status == "done"}
    assert done_before and len(done_before) < len(names)
    assert set(entries) == set(names) and all(e.status in ("done", "pending") for e in entries.values())
    mtimes = {n: (out / _output(n)).stat().st_mtime_ns for n in done_before}

    rc, stdout, _ = _run_cli(str(tmp_path / "in"), "-o", str(out), "--workers", "2")  # the same command again
    assert rc == 0 and f"{len(names)} done ({len(done_before)} by earlier runs)" in stdout
    assert f"restored {len(names) - len(done_before)} " in stdout
    assert {n: (out / _output(n)).stat().st_mtime_ns for n in done_before} == mtimes


def test_unknown_restore_options_and_overlapping_folders_are_refused_before_any_work(tmp_path):
    _write_photos(tmp_path / "in", ["a.png"])
    with pytest.raises(ValueError, match="unknown restore option"):
        restore_many(tmp_path / "in", tmp_path / "out", restore_options={"target_sise": 128}, progress=False)
    with pytest.raises(PureLiteError, match="must not be the input folder"):
        restore_many(tmp_path / "in", tmp_path / "in", progress=False)
    with pytest.raises(PureLiteError, match="must not be the input folder or contain it"):
        restore_many(tmp_path / "in", tmp_path, progress=False)
    assert not (tmp_path / "out").exists()


def test_load_options_are_checked_before_any_work(tiny_compact, tmp_path):
    """Unknown names or values, or quantization asked of an export (the default model): refused before Ray starts
    or the output folder is made; on the command line as one error line."""
    _write_photos(tmp_path / "in", ["a.png"])
    for options, error, message in (({"quantisation": "nf4"}, ValueError, "unknown load option"),
                                    ({"quantization": "int2"}, ValueError, "choose 'nf4' or 'int8' or 'int4'"),
                                    ({"kv_cache": "int8"}, PureLiteError, "applies to a checkpoint folder")):
        with pytest.raises(error, match=message):
            restore_many(tmp_path / "in", tmp_path / "out", load_options=options, progress=False)
    assert not (tmp_path / "out").exists()
    rc, _, stderr = _run_cli(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quantize", "nf4")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "--quantize nf4 applies to a checkpoint folder" in errors[0], stderr
    assert not (tmp_path / "out").exists()


def test_the_load_options_listed_without_torch_are_the_torch_backends():
    """batch.LOAD_OPTIONS (which the CLI's choices also use) is written out so that restore-many can check its
    options without importing torch: its quantizations must be exactly the torch backend's."""
    from typing import get_args

    from pure_lite.batch import LOAD_OPTIONS

    torch_backend = pytest.importorskip("pure_lite.torch_backend.quantize")
    assert LOAD_OPTIONS["quantization"] == get_args(torch_backend.Quantization)


def test_load_options_reach_the_workers_and_are_part_of_the_settings(local_ray, tiny_compact, tmp_path):
    """A checkpoint folder with kv_cache="int8": the worker loads it so (its output's provenance names the
    backend it ran), and the same folder refuses a run without the option."""
    pytest.importorskip("torch", reason="a checkpoint folder runs on the torch backend: install the [torch] extra")
    from conftest import TARGET

    _write_photos(tmp_path / "in", ["a.png"])
    options = {"target_size": TARGET}
    report = restore_many(tmp_path / "in", tmp_path / "out", model=tiny_compact, restore_options=options,
                          load_options={"kv_cache": "int8"}, config=BatchConfig(workers=1), progress=False)
    assert report.count("done") == 1, [e.error for e in report.entries]
    assert batch._provenance(tmp_path / "out" / "a_restored.png")["model"] == "torch (cpu, float32, int8 KV cache)"
    assert json.loads((tmp_path / "out" / "restore-many-report.json").read_text())["settings"]["load_options"] == {
        "kv_cache": "int8"}
    with pytest.raises(JournalError, match="load_options differ"):
        restore_many(tmp_path / "in", tmp_path / "out", model=tiny_compact, restore_options=options,
                     config=BatchConfig(workers=1), progress=False)


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path):
    _write_photos(tmp_path / "in", ["a.png", "deeper/b.png"])
    (tmp_path / "in" / "restored").mkdir()
    _write_photos(tmp_path / "in" / "restored", ["a_restored.png"])
    found = batch.find_images(tmp_path / "in", skip=(tmp_path / "in" / "restored").resolve())
    assert [name for name, _ in found] == ["a.png", "deeper/b.png"]


def test_progress_counts_tiles_done_across_workers(local_ray, tmp_path, capsys):
    """Off a terminal: a line per tenth of the tiles, counted while the image is still being restored."""
    from pure_lite.console import LINE_STEPS

    (tmp_path / "in").mkdir()
    pixels = (np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in" / "a.png")  # x4: 512x256, 5 x 3 = 15 tiles
    report = restore_many(tmp_path / "in", tmp_path / "out", restore_options={"tile_batch": 1},
                          config=BatchConfig(workers=1), progress=True)
    assert report.count("done") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "tiles" in line]
    counts = [re.search(r"(\d+)/(\d+) tiles", line).groups() for line in lines]
    assert counts[-1] == ("15", "15") and {total for _, total in counts} == {"15"}
    assert len(lines) <= LINE_STEPS + 1
    # tiles reported while the image was still being restored (the driver polls every second; 15 tiles take
    # several seconds on any CPU this runs on, so a run without one would mean the reports never arrived)
    assert any(0 < int(done) < 15 for done, _ in counts), lines


def test_image_seed_is_stable_across_processes_and_differs_per_name_and_base_seed():
    code = "from pure_lite.batch import image_seed; print(image_seed(7, 'sub/a.png'))"
    values = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip() for h in ("1", "2")}
    assert values == {str(image_seed(7, "sub/a.png"))}
    assert len({image_seed(7, "sub/a.png"), image_seed(7, "sub/b.png"), image_seed(8, "sub/a.png")}) == 3


def test_journal_ignores_a_torn_last_line_and_refuses_a_corrupt_one(tmp_path):
    settings = {"model": "m", "seed": 0, "restore_options": {}}
    with Journal(tmp_path, settings) as journal:
        journal.rewrite([Entry("a.png", "pending", "0" * 64, "a_restored.png")])
        journal.record(Entry("a.png", "done", "0" * 64, "a_restored.png", attempts=1, seconds=1.0))
    path = tmp_path / JOURNAL_FILE
    whole = path.read_text()
    path.write_text(whole + '{"name": "b.png", "status": "do')  # a kill in the middle of a write
    assert read_journal(tmp_path)[1]["a.png"].status == "done"
    lines = whole.splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(JournalError, match="line 2"):
        read_journal(tmp_path)


def test_journal_lock_keeps_a_second_run_out(tmp_path):
    settings = {"model": "m", "seed": 0, "restore_options": {}}
    with Journal(tmp_path, settings):
        with pytest.raises(JournalError, match="another restore-many run"):
            Journal(tmp_path, settings)
    Journal(tmp_path, settings).close()  # released with its holder


def test_importing_the_command_line_does_not_import_ray():
    code = "import sys, pure_lite.cli, pure_lite.batch; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# Hardening (issue 34 groups 2, 4, 9) and a newcomer's rough edges (issue 38).

def _journal_with(folder: Path, *lines: str) -> Path:
    """A journal whose header is valid and whose entries are ``lines`` as given (what an editor could leave)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"journal": "pure-lite restore-many", "version": 1, "settings": {}})
    (folder / JOURNAL_FILE).write_text("\n".join([header, *lines]) + "\n")
    return folder


def _entry_line(**changes) -> str:
    record = {"name": "a.png", "status": "pending", "input_sha256": "0" * 64, "output": "a_restored.png",
              "attempts": 0, "seconds": None, "degradation": None, "error": None}
    return json.dumps({**record, **changes})


@pytest.mark.parametrize("line, reason", [
    (_entry_line(output="../escape/a_restored.png"), "is not the output name of"),
    (_entry_line(output="/tmp/escape/a_restored.png"), "is not the output name of"),
    (_entry_line(output="sub/a_restored.png"), "is not the output name of"),
    (_entry_line(output="b_restored.png"), "is not the output name of"),
    (_entry_line(name="../a.png", output="../a_restored.png"), "not a path inside"),
    (_entry_line(name="/etc/a.png", output="/etc/a_restored.png"), "not a path inside"),
    (_entry_line(status="finished"), "status"),
    (_entry_line(attempts="3"), "attempts"),
    (_entry_line(input_sha256=7), "input_sha256"),
    (json.dumps([1, 2, 3]), "expected an object"),
    (json.dumps({"name": "a.png"}), "expected the fields"),
    (json.dumps({**json.loads(_entry_line()), "extra": 1}), "expected the fields"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('"' + "x" * (2 << 20) + '"', "longer than"),
])
def test_journal_lines_of_the_wrong_shape_are_one_clear_error(tmp_path, line, reason):
    _journal_with(tmp_path, _entry_line(status="done"), line)
    with pytest.raises(JournalError, match="line 3") as caught:
        read_journal(tmp_path)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_journal_output_outside_the_output_folder_is_refused_not_written(tmp_path, monkeypatch):
    """The attack: a rerun whose journal names ../escape/... must write nothing there, nor start Ray."""
    _write_photos(tmp_path / "in", ["a.png"])
    out = _journal_with(tmp_path / "out", _entry_line(output="../escape/a_restored.png"))
    monkeypatch.setattr(batch, "_ray", lambda: pytest.fail("a refused journal must not start Ray"))
    rc, stdout, stderr = _run_cli(str(tmp_path / "in"), "-o", str(out))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "line 2" in errors[0] and "Traceback" not in stderr, stderr
    assert not (tmp_path / "escape").exists() and sorted(p.name for p in out.iterdir()) == [JOURNAL_FILE,
                                                                                             "restore-many.lock"]
    assert batch.output_name("sub/a.jpg", {"sub/a_restored.png"}) == "sub/a_jpg_restored.png"


def test_the_journal_gets_the_mode_of_a_plain_write(tmp_path):
    from pure_lite.atomic import plain_file_mode

    with Journal(tmp_path, {"model": "m", "seed": 0, "restore_options": {}}) as journal:
        journal.rewrite([Entry("a.png", "pending", "0" * 64, "a_restored.png")])
    assert (tmp_path / JOURNAL_FILE).stat().st_mode & 0o777 == plain_file_mode()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_in_the_folder_is_recorded_failed_not_read(tmp_path, monkeypatch):
    """Nothing else is pending, so the run never starts Ray: it must finish at once, the FIFO named."""
    import threading

    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / "pipe.png")
    monkeypatch.setattr(batch, "_ray", lambda: pytest.fail("nothing here needs a worker"))
    reports = []
    thread = threading.Thread(target=lambda: reports.append(restore_many(tmp_path / "in", tmp_path / "out",
                                                                         progress=False)), daemon=True)
    thread.start()
    thread.join(30)
    assert reports, "restore-many blocked on a FIFO"
    (entry,) = reports[0].entries
    assert entry.status == "failed" and "FIFO" in entry.error and entry.input_sha256 is None
    with pytest.raises(JournalError, match="FIFO"):  # a journal that is a FIFO is not read either
        (tmp_path / "out2").mkdir()
        os.mkfifo(tmp_path / "out2" / JOURNAL_FILE)
        _finish_soon(lambda: read_journal(tmp_path / "out2"))


def _finish_soon(fn, seconds: float = 10.0):
    """fn() from a daemon thread; fails the test if it blocks, else returns its value or raises its error."""
    import threading

    outcome = []

    def run():
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for {seconds} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def test_settings_rejected_at_start_leave_nothing_behind(tmp_path):
    """--scale -2 or --target-size 7 are refused before the journal records them, so the corrected rerun runs."""
    _write_photos(tmp_path / "in", ["a.png"])
    for options, message in (({"scale": -2}, "scale must be a positive number"),
                             ({"target_size": 7}, "target_size must be a positive multiple of 32"),
                             ({"tile_batch": 0}, "tile_batch")):
        with pytest.raises(ValueError, match=message):
            restore_many(tmp_path / "in", tmp_path / "out", restore_options=options, progress=False)
        assert not (tmp_path / "out").exists()
    for args, message in ((["--scale", "-2"], "must be a positive number"),
                          (["--target-size", "7"], "must be a positive multiple of 32")):
        result = subprocess.run([sys.executable, "-m", "pure_lite.cli", "restore-many", str(tmp_path / "in"), "-o",
                                 str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and not (tmp_path / "out").exists()


def test_a_folder_without_images_is_an_error_naming_the_extensions(tmp_path, monkeypatch):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    monkeypatch.setattr(batch, "_ray", lambda: pytest.fail("nothing to do"))
    rc, stdout, stderr = _run_cli(str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "no image found" in errors[0] and ".png" in errors[0], stderr
    assert ".jpg" in errors[0] and not (tmp_path / "out").exists() and stdout == ""


def test_a_bad_model_or_an_unwritable_output_folder_stop_the_run_before_ray(tmp_path, monkeypatch):
    _write_photos(tmp_path / "in", ["a.png"])
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(batch, "_ray", lambda: pytest.fail("Ray must not start"))
    for model, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "is not a PURE checkpoint")):
        rc, _, stderr = _run_cli(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(model))
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0], stderr
        assert not (tmp_path / "out").exists()
    if Path("/proc/self").is_dir():  # an existing folder nobody can create files in, root included
        rc, _, stderr = _run_cli(str(tmp_path / "in"), "-o", "/proc")
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "cannot write into the output folder /proc" in errors[0], stderr


def test_a_full_disk_stops_the_run_with_one_message_and_the_image_stays_pending(local_ray, tmp_path, monkeypatch):
    """ENOSPC on the first output: not charged to every image, but one error; the rerun resumes. The image the
    worker took has its attempt recorded the moment it was sent (it stayed 0 before)."""
    import errno

    from pure_lite import images
    from pure_lite.atomic import atomic_path

    def disk_full(data, path, *, overwrite=True):
        with atomic_path(path, overwrite=overwrite):
            raise OSError(errno.ENOSPC, "No space left on device")

    names = ["a.png", "b.png", "c.png"]
    _write_photos(tmp_path / "in", names, seed=3)
    monkeypatch.setattr(images, "write_bytes_atomic", disk_full)
    seen = {}

    def attempts_when_sent(name, worker):
        seen[name] = read_journal(tmp_path / "out")[1][name].attempts

    with pytest.raises(OutputError, match="No space left on device.*run the same command to resume"):
        restore_many(tmp_path / "in", tmp_path / "out", config=BatchConfig(workers=1), progress=False,
                     on_dispatch=attempts_when_sent)
    entries = read_journal(tmp_path / "out")[1]
    assert {e.status for e in entries.values()} == {"pending"}  # nothing charged as failed
    assert set(seen.values()) == {1} and all(entries[n].attempts == 1 for n in seen)
    assert not list((tmp_path / "out").glob("*_restored.png"))
