"""What the command line shows while long work runs: progress it can trust, not the libraries' logs.

``TileProgress`` reports a restoration in whole tiles (or a restore-many run in tiles over all
its workers) with a time left once some tiles have given a rate: redrawn in place on a terminal,
and off a terminal (a log, a pipe) one line per tenth of the work (``LINE_STEPS``), so a log gets
at most 11 lines however long the run.

Exporting runs torch.onnx, onnxscript, onnx_ir, transformers and ONNX Runtime's quantizer, which
together print hundreds of lines (logging records, warnings, progress bars, C++ messages). The
``pure-lite`` command runs such steps inside ``captured_output``, which sends all of it to a log
file, and shows its own ``StageBar`` instead; ``-v`` skips the capture.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

_STAGE = re.compile(r"\s*\[(\d+)/(\d+)\]\s*(.*)")


@contextlib.contextmanager
def captured_output(log: Path) -> Iterator[TextIO]:
    """Send stdout and stderr to ``log`` (Python's streams, hence logging, warnings and progress
    bars, and file descriptors 1 and 2, hence C/C++ code); yield a stream to the real stderr."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w")
    try:
        with open(log, "w", encoding="utf-8") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    yield terminal
            finally:
                for stream in (sys.__stdout__, sys.__stderr__):
                    if stream is not None:
                        stream.flush()
                sink.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        terminal.close()


class StageBar:
    """A progress callback for messages of the form "[k/N] what": on a terminal, a bar over the N
    stages that shows the latest stage, any other message (the weights' "i/n tensors") becoming
    its postfix; off a terminal, one line per stage and nothing else."""

    def __init__(self, stream: TextIO, *, disable: bool = False):
        from tqdm.auto import tqdm

        isatty = getattr(stream, "isatty", None)
        self.stream = None if disable or (isatty and isatty()) else stream  # off a terminal: plain lines
        self.bar = tqdm(total=1, file=stream, disable=disable or self.stream is not None, unit="stage", leave=False,
                        bar_format="{desc} |{bar:20}| {n_fmt}/{total_fmt} {postfix}")

    def __call__(self, message: str) -> None:
        stage = _STAGE.match(message)
        if self.stream is not None:
            if stage is not None:
                self.stream.write(message.strip() + "\n")
                self.stream.flush()
            return
        if stage is None:
            self.bar.set_postfix_str(message.strip()[:60])
            return
        done, total, what = int(stage[1]) - 1, int(stage[2]), stage[3]
        self.bar.total, self.bar.n = total, done
        self.bar.set_postfix_str("")
        self.bar.set_description(what[:60])

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LINE_STEPS = 10  # off a terminal: a line each time another tenth of the tiles is done (at most 11 per run)
_REDRAW_S = 0.2  # on a terminal: redraw at most this often (and always at the end)


def duration(seconds: float) -> str:
    """'45 s', '7 min 39 s', '1 h 05 min': a time a reader takes in at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


class TileProgress:
    """A ``progress(tiles_done, tiles_total)`` callback that shows whole tiles done, the time spent
    and, once some work is done, the time left at the rate so far (started at the first call,
    so a model's loading does not count). ``tiles_done`` may be fractional (``Restorer.restore``
    reports a batch's tiles advancing together): the count shown is whole, the estimate uses the
    fraction, so it appears before the first tile is finished. Calls between redraws or lines cost
    nothing but a comparison."""

    def __init__(self, label: str, stream: TextIO | None = None, *, unit: str = "tiles"):
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.started: float | None = None
        self.done = self.total = 0
        self.next_step = 0  # off a terminal: the next line is written once done / total >= next_step / LINE_STEPS
        self.drawn = 0.0  # on a terminal: when the line was last redrawn
        self.width = 0

    def __call__(self, done: float, total: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        changed = (done, total) != (self.done, self.total)
        self.done, self.total = done, total
        if self.terminal:
            if changed and (now - self.drawn >= _REDRAW_S or done >= total):
                self._write("\r" + self._status(now), end="")
                self.drawn = now
        elif done * LINE_STEPS >= self.next_step * total:  # in integers: no rounding decides a line
            self._write(self._status(now))
            self.next_step = (int(done * LINE_STEPS // total) if total else LINE_STEPS) + 1

    def _status(self, now: float) -> str:
        elapsed = now - (self.started or now)
        line = f"{self.label}: {int(self.done)}/{self.total} {self.unit}"
        if self.total:
            line += f" ({int(100 * self.done // self.total)}%)"
        line += f", {duration(elapsed)}"
        if 0 < self.done < self.total:
            line += f", about {duration(elapsed / self.done * (self.total - self.done))} left"
        return line

    def _write(self, text: str, end: str = "\n") -> None:
        if self.terminal:  # pad over the longer line this one replaces
            text, self.width = text.ljust(self.width), max(self.width, len(text))
        self.stream.write(text + end)
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal (off one, each line is already complete)."""
        if self.terminal and self.started is not None:
            self._write("")
