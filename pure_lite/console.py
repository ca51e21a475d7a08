"""What the command line shows while a chatty library step runs: a bar, not the libraries' logs.

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
    """A progress callback for messages of the form "[k/N] what": a bar over the N stages that
    shows the latest stage; any other message becomes the bar's postfix."""

    def __init__(self, stream: TextIO, *, disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=1, file=stream, disable=disable, unit="stage", leave=False,
                        bar_format="{desc} |{bar:20}| {n_fmt}/{total_fmt} {postfix}")

    def __call__(self, message: str) -> None:
        stage = _STAGE.match(message)
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
