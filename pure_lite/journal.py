"""The journal of a ``restore-many`` run: per input, done / failed (with the error) / pending.

It lives in the output folder so that a rerun of the same command knows what is finished. It is
an append-only JSON Lines file: a header line with the run's settings, then one line per change
of an input's state; the last line about an input wins. Each line is written with one ``write``
and flushed to disk before the run goes on, so a killed run leaves at worst a torn last line,
which loading ignores. At the start of each run the file is rewritten compactly (one line per
input) through a temporary file and a rename, so that rewrite cannot corrupt it either.

A lock file held with ``flock`` keeps two runs from writing into one output folder at once (the
operating system drops it when the holder dies, so a killed run leaves no stale lock).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from .errors import PureLiteError

JOURNAL_FILE = "restore-many-journal.jsonl"
LOCK_FILE = "restore-many.lock"
VERSION = 1

Status = Literal["pending", "done", "failed"]


class JournalError(PureLiteError):
    """A journal that cannot be used: corrupt, from another version or other settings, or locked by another run."""


@dataclass(frozen=True)
class Entry:
    """What the journal knows about one input."""

    name: str  # the input's path relative to INPUT_DIR, with "/" separators
    status: Status
    input_sha256: str | None  # of the content that was (or is to be) restored; None: the file was unreadable
    output: str  # the output's path relative to OUTPUT_DIR, fixed when the input is first seen
    attempts: int = 0  # how many times a worker took it (a worker that died mid-image counts)
    seconds: float | None = None  # restoration time on the worker, when done
    degradation: str | None = None  # the model's degradation statement, when done
    error: str | None = None  # why it failed (or, while pending, why the last attempt did not finish)


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def _read(path: Path) -> tuple[dict, dict[str, Entry]]:
    text = path.read_text(encoding="utf-8")
    # What follows the last newline is empty, or a line that a kill cut short: never a complete record.
    lines = text.split("\n")[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise JournalError(f"{path}: line {number} is not valid JSON ({exc}); it was not written by "
                               "pure-lite or was edited by hand") from exc
    if not records or records[0].get("journal") != "pure-lite restore-many":
        raise JournalError(f"{path} is not a pure-lite restore-many journal")
    header = records[0]
    if header.get("version") != VERSION:
        raise JournalError(f"{path} has journal version {header.get('version')}; this pure-lite reads {VERSION}")
    entries = {}
    for record in records[1:]:
        entry = Entry(**record)
        entries[entry.name] = entry
    return header, entries


def _settings_difference(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


class Journal:
    """The journal of one output folder, open for one run (use as a context manager)."""

    def __init__(self, output_dir: str | os.PathLike, settings: dict[str, Any]):
        """Lock OUTPUT_DIR's journal and read it; refuse it when it was written with other settings."""
        self.dir = Path(output_dir)
        self.path = self.dir / JOURNAL_FILE
        self.settings = settings
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.dir / LOCK_FILE)
        self._file = None
        try:
            self.entries: dict[str, Entry] = {}
            if self.path.exists():
                header, self.entries = _read(self.path)
                differ = _settings_difference(header["settings"], settings)
                if differ:
                    raise JournalError(
                        f"{self.dir} holds a restore-many run with other settings ({', '.join(differ)} differ); "
                        "use another output folder, or the same settings to resume it")
        except BaseException:
            self.close()
            raise

    def rewrite(self, entries: Iterable[Entry]) -> None:
        """Replace the file by the header and one line per entry (atomically), then open it for appends."""
        self.entries = {e.name: e for e in entries}
        header = {"journal": "pure-lite restore-many", "version": VERSION, "settings": self.settings}
        fd, tmp = tempfile.mkstemp(prefix=f".{JOURNAL_FILE}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(_line(header))
                f.writelines(_line(asdict(e)) for e in self.entries.values())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")

    def record(self, entry: Entry) -> None:
        """Append one entry's new state and flush it to disk before returning."""
        self.entries[entry.name] = entry
        self._file.write(_line(asdict(entry)))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(path: Path):
    """An open file holding an exclusive ``flock`` on ``path`` (no lock where ``fcntl`` is missing, e.g. Windows)."""
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.close()
        raise JournalError(f"another restore-many run is writing into {path.parent} ({exc.strerror})") from exc
    return f


def read_journal(output_dir: str | os.PathLike) -> tuple[dict, dict[str, Entry]]:
    """The header and the latest entry per input of OUTPUT_DIR's journal (read-only; no lock)."""
    return _read(Path(output_dir) / JOURNAL_FILE)
