"""Control requests between a dump's readers and its writer: the stop request.

A watcher on the analysis side (``tdump check --watch``, the loop) asks training to
stop by writing one small JSON document, :data:`STOP_KEY`, at the root of the dump.
The capture hook polls for it cheaply (at saved steps, and at most every
:data:`POLL_SECONDS` otherwise), commits the current record, closes the store and
ends training with exit status :data:`STOPPED_EXIT_CODE`. The key is plain JSON, not
a Zarr node, so Zarr readers ignore it; it works on any fsspec URL that both sides
can reach. Neither side imports torch here.

Document (``docs/FORMAT.md``, section "Stop request")::

    {"format": "tdump.stop", "format_version": 1, "reason": "...", "requested_by": "...",
     "time": <unix seconds>, "step": <int or null>}

Examples
--------
>>> url = "memory://doc/control.zarr"
>>> read_stop_request(url) is None
True
>>> write_stop_request(url, "accuracy fell 12 points", requested_by="doc", step=40)
>>> req = read_stop_request(url)
>>> req.reason, req.step
('accuracy fell 12 points', 40)
>>> clear_stop_request(url); read_stop_request(url) is None
True
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "POLL_SECONDS",
    "STOPPED_EXIT_CODE",
    "STOP_FORMAT",
    "STOP_KEY",
    "StopRequest",
    "clear_stop_request",
    "read_stop_request",
    "write_stop_request",
]

#: Name of the stop document at the root of a dump.
STOP_KEY = "tdump.stop.json"
STOP_FORMAT = "tdump.stop"
#: Exit status of a training process that stopped because a stop request was found.
STOPPED_EXIT_CODE = 75
#: How often (seconds) the hook looks for a stop request between saved steps.
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class StopRequest:
    """A request to stop training, as read back from a dump."""

    reason: str
    requested_by: str
    time: float
    step: int | None


def _fs_path(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(os.fspath(url), **(storage_options or {}))
    return fs, root.rstrip("/") + "/" + STOP_KEY


def write_stop_request(
    url: str,
    reason: str,
    *,
    requested_by: str = "",
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Ask the writer of the dump at ``url`` to stop training (idempotent; last writer wins)."""
    fs, path = _fs_path(url, storage_options)
    doc = {
        "format": STOP_FORMAT,
        "format_version": 1,
        "reason": reason,
        "requested_by": requested_by,
        "time": time.time(),
        "step": step,
    }
    data = json.dumps(doc).encode()
    if isinstance(fs, LocalFileSystem):
        # A local reader must never see half a document: write aside, then rename.
        tmp = f"{path}.{os.getpid()}.partial"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # object stores write a key whole


def read_stop_request(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> StopRequest | None:
    """The stop request in the dump at ``url``, or ``None`` (also for an unreadable document)."""
    fs, path = _fs_path(url, storage_options)
    try:
        doc = json.loads(_read(fs, path))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != STOP_FORMAT:
        return None
    step = doc.get("step")
    return StopRequest(
        reason=str(doc.get("reason", "")),
        requested_by=str(doc.get("requested_by", "")),
        time=float(doc.get("time", 0.0)),
        step=step if isinstance(step, int) else None,
    )


def _read(fs: Any, path: str) -> bytes:
    """The bytes at ``path``; a local file without a Python-level file object.

    The hook polls from the training thread, where Ctrl-C is handled. fsspec's local
    file is an ``io.IOBase`` subclass in Python, and CPython's finalizer of such an
    object runs its ``closed`` property and clears any error raised there: a SIGINT
    handled at that moment was lost and training went on (1 Ctrl-C in ~200 under
    ``tdump record``). The builtin ``open`` is C throughout.
    """
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as fh:
            return fh.read()
    return bytes(fs.cat_file(path))


def clear_stop_request(url: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a stop request (a writer that appends to a stopped dump starts clean)."""
    fs, path = _fs_path(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
