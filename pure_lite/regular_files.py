"""Opening what a user names (input images, a restore-many journal): regular files only.

A FIFO opened for reading blocks until something writes into it, a character device such as
/dev/zero never ends, and a folder cannot be decoded: each would hang a run or fail it obscurely.
The file is opened non-blocking (so a FIFO without a writer returns at once) and checked with
``fstat`` on the descriptor itself, so it cannot be swapped for something else between a check
and the open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFileError(OSError):
    """The path exists but is not a regular file (a folder, a FIFO, a device, a socket)."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (symbolic links followed), else NotRegularFileError.

    Other failures (missing, no permission) are the OSError ``open`` raises.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFileError(f"{path} is {kind}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """The whole content of the regular file ``path`` (see ``open_regular``)."""
    with open_regular(path) as f:
        return f.read()


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an input without opening it (None: it is a regular file, or a link to one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return f"{next((name for test, name in _KINDS if test(mode)), 'not a regular file')}, not a regular file"
