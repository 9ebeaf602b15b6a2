"""Write a local file whole or not at all: a temporary file beside it, then a rename.

A failed write (disk full, quota, an interrupt) removes the temporary file and leaves
whatever was at ``path`` as it was. The file gets the usual mode (``0o666`` less the
umask, not ``mkstemp``'s 0600). Callers turn :class:`OSError` into their own one-line
error.

Examples
--------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
>>> write_atomic(path, lambda fh: fh.write(b"abc"), tmp_prefix=".x.")
>>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
(b'abc', ['x.bin'])
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from typing import IO, Any

__all__ = ["write_atomic"]


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, tmp_prefix: str
) -> None:
    """Call ``write(fh)`` on ``<folder>/<tmp_prefix><hex>.partial``, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{tmp_prefix}{uuid.uuid4().hex[:12]}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
