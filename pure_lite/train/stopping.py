"""When a training loop should stop at the end of its current step: its deadline passed, or it was asked to.

Training PURE-tiny takes hours on a CPU, in sittings (docs/pure-tiny.md). Ctrl-C or SIGTERM in the
middle of an optimizer step would leave nothing newer than the last periodic checkpoint, so inside
``stop_on_signals`` the first of them becomes a request that the loops honour at the end of the
step they are in, saving a checkpoint exactly as when ``--minutes`` runs out; a second one
interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import PureLiteError

_requested = threading.Event()


def stop_reason(deadline: float | None) -> str | None:
    """Why a loop should stop now ("asked to stop", "time is up"), or None to go on."""
    if _requested.is_set():
        return "asked to stop"
    if deadline is not None and time.monotonic() > deadline:
        return "time is up"
    return None


@contextmanager
def stop_on_signals(log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into a stop request for the duration; handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def handler(signum, frame):
        if _requested.is_set():
            raise KeyboardInterrupt
        _requested.set()
        if log is not None:
            log(f"{signal.Signals(signum).name}: saving at the end of this step (send it again to stop at once)")

    _requested.clear()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _requested.clear()


def run_resumable(job: Callable[[], object], unfinished: str) -> int:
    """A resumable command's exit status: 0 when ``job()`` finished, 1 when it returned None (stopped
    early: ``unfinished`` is printed with how to go on), 2 with one ``error:`` line for bad input."""
    try:
        with stop_on_signals(print):
            done = job()
    except (PureLiteError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if done is None:
        print(f"{unfinished}; run the same command again to go on")
        return 1
    return 0
