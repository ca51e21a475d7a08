"""Atomic writes: build a file beside its target, then rename it into place.

A reader never sees a half-written file, and an interrupted write leaves nothing behind.
The temporary file comes from ``mkstemp``, which creates it mode 0600 so nobody else can
read it while it is written; before the rename it gets the mode a plain ``open(path, "w")``
would have given (0666 less the umask), so outputs stay readable by the services and users
they are meant for. Export folders built in a ``mkdtemp`` sibling (mode 0700) get the
matching folder mode from ``publish_folder_modes``.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it and put it back
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode a newly created file gets from ``open(path, "w")``: 0666 less the umask."""
    return 0o666 & ~_umask()


def plain_folder_mode() -> int:
    """The mode a newly created folder gets from ``mkdir``: 0777 less the umask."""
    return 0o777 & ~_umask()


def publish_folder_modes(folder: Path) -> None:
    """Give ``folder`` and the files directly in it the modes a plain mkdir/open would have given."""
    file_mode = plain_file_mode()
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)
    folder.chmod(plain_folder_mode())


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if ``path`` exists, atomically: no check-then-write race
    except FileExistsError:
        raise OutputError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise OutputError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it") from None
        os.replace(tmp, path)


def make_folder(path: Path) -> None:
    """Create the folder ``path`` goes in, or raise OutputError saying why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise OutputError(f"cannot write {path}: {blocker} is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: cannot create {path.parent}: {exc.strerror or exc}") from exc


def check_writable_folder(folder: Path) -> None:
    """Create and remove a file in ``folder``: the OSError a write would meet (no permission, read-only
    file system) is raised now, before hours of work whose result could not be saved."""
    fd, name = tempfile.mkstemp(prefix=".pure-lite-write-check.", dir=folder)
    os.close(fd)
    os.unlink(name)


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it becomes ``path``.

    The parent folder is created if needed. Any OSError (the parent is a file, no permission,
    ``path`` is a folder, disk full) is raised as OutputError naming ``path``. With
    ``overwrite=False`` an existing ``path`` is never replaced.
    """
    path = Path(path)
    tmp = None
    try:
        make_folder(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        tmp.chmod(plain_file_mode())
        _publish(tmp, path, overwrite)
    except OutputError:
        raise
    except OSError as exc:
        error = OutputError(f"cannot write {path}: {exc.strerror or exc}")
        error.errno = exc.errno  # so that a caller can tell a full disk (ENOSPC) from one bad output
        raise error from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
