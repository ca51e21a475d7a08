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

import itertools
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Literal, get_args

from .atomic import check_writable_folder, plain_file_mode
from .errors import PureLiteError
from .regular_files import open_regular

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


MAX_LINE_BYTES = 1 << 20  # a line holds one input's state: its name, hash, output and error message
_FIELDS = {f.name for f in fields(Entry)}
_REQUIRED = {"name", "status", "input_sha256", "output"}


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def output_name(name: str, taken: set[str]) -> str:
    """``dir/stem_restored.png``; where two inputs share a stem (a.png, a.jpg) the later one gets its suffix in the name."""
    p = PurePosixPath(name)
    stems = itertools.chain([p.stem, f"{p.stem}_{p.suffix[1:]}"], (f"{p.stem}_{p.suffix[1:]}_{i}" for i in itertools.count(2)))
    return next(str(c) for c in (p.with_name(f"{stem}_restored.png") for stem in stems) if str(c) not in taken)


def is_output_name(name: str, output: str) -> bool:
    """Whether ``output_name`` could have given ``output`` to the input ``name``: beside it, named after it.

    A journal is read back from a folder anyone may have edited; an output taken from it as given could
    name ``../elsewhere`` or an absolute path, so only the names derived from the input are accepted.
    """
    p, o = PurePosixPath(name), PurePosixPath(output)
    pattern = rf"{re.escape(p.stem)}(?:_{re.escape(p.suffix[1:])}(?:_[2-9]|_[1-9][0-9]+)?)?_restored\.png"
    return o.parent == p.parent and re.fullmatch(pattern, o.name) is not None


def _is_relative_name(name: Any) -> bool:
    """A path below a folder in "/" form: no absolute path, no "..", ".", empty or NUL component."""
    return (isinstance(name, str) and bool(name) and "\0" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


def _shown(value: Any) -> str:
    """A value from a journal line for an error message: its repr, cut short (a line may hold a megabyte)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(record: Any) -> Entry:
    """One journal line as an Entry, or ValueError saying what about it is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if not _REQUIRED <= set(record) <= _FIELDS:
        raise ValueError(f"expected the fields {', '.join(sorted(_FIELDS))}, got {_shown(sorted(record))}")
    entry = Entry(**record)
    if not _is_relative_name(entry.name):
        raise ValueError(f"name {_shown(entry.name)} is not a path inside the input folder")
    if entry.status not in get_args(Status):
        raise ValueError(f"status {_shown(entry.status)} is not one of {', '.join(get_args(Status))}")
    if entry.input_sha256 is not None and not (isinstance(entry.input_sha256, str)
                                               and re.fullmatch("[0-9a-f]{64}", entry.input_sha256)):
        raise ValueError(f"input_sha256 {_shown(entry.input_sha256)} is not a SHA-256 in hex")
    if not isinstance(entry.output, str) or not is_output_name(entry.name, entry.output):
        raise ValueError(f"output {_shown(entry.output)} is not the output name of {_shown(entry.name)}")
    if type(entry.attempts) is not int or entry.attempts < 0:
        raise ValueError(f"attempts {_shown(entry.attempts)} is not a count")
    if entry.seconds is not None and (type(entry.seconds) not in (int, float) or not entry.seconds >= 0):
        raise ValueError(f"seconds {_shown(entry.seconds)} is not a duration")
    for key in ("degradation", "error"):
        if getattr(entry, key) is not None and not isinstance(getattr(entry, key), str):
            raise ValueError(f"{key} is not text")
    return entry


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of each complete line, none longer than MAX_LINE_BYTES; only regular files are opened."""
    try:
        f = open_regular(path)
    except OSError as exc:
        raise JournalError(f"cannot read the journal {path}: {exc.strerror or exc}") from exc
    with f:
        for number in itertools.count(1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if len(line) > MAX_LINE_BYTES:
                raise JournalError(f"{path}: line {number} is longer than {MAX_LINE_BYTES} bytes; it was not "
                                   "written by pure-lite")
            # What follows the last newline is empty, or a line that a kill cut short: never a complete record.
            if not line.endswith(b"\n"):
                return
            try:
                yield number, line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JournalError(f"{path}: line {number} is not UTF-8 text; it was not written by pure-lite") from exc


def _read(path: Path) -> tuple[dict, dict[str, Entry]]:
    header, entries = None, {}
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise JournalError(f"{path}: line {number} is not valid JSON ({reason}); it was not written by "
                               "pure-lite or was edited by hand") from None
        if header is None:
            if not (isinstance(record, dict) and record.get("journal") == "pure-lite restore-many"):
                raise JournalError(f"{path} is not a pure-lite restore-many journal")
            if record.get("version") != VERSION:
                raise JournalError(f"{path} has journal version {record.get('version')!r}; this pure-lite reads {VERSION}")
            if not isinstance(record.get("settings"), dict):
                raise JournalError(f"{path}: line 1 has no settings object; it was edited by hand")
            header = record
            continue
        try:
            entry = _entry(record)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"{path}: line {number} is not a journal entry ({exc}); it was edited by hand") from None
        entries[entry.name] = entry
    if header is None:
        raise JournalError(f"{path} is not a pure-lite restore-many journal")
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
        self._lock = self._file = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(self.dir / LOCK_FILE)
            check_writable_folder(self.dir)
        except OSError as exc:  # before any input is read: an output folder that cannot be written stops the run now
            self.close()
            raise JournalError(f"cannot write into the output folder {self.dir}: {exc.strerror or exc}") from None
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
            os.chmod(tmp, plain_file_mode())  # mkstemp made it 0600; the outputs and report follow the umask
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
