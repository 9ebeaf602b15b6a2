"""The end of a capturing process: the exit flush, SIGTERM, and a requested stop.

**Exit flush.** A script that never closes its hook (no ``with hook:``, ``import
tdump.capture.auto``) still gets every queued record committed: :func:`at_exit`
callbacks run from ``threading``'s exit hooks, which Python runs *before* it shuts
down ``concurrent.futures`` executors (zarr writes through asyncio's default executor;
a plain :mod:`atexit` callback runs after that shutdown and fails with "cannot
schedule new futures after shutdown").

**SIGTERM** (what SLURM and Kubernetes send before a kill) is turned into
``SystemExit(143)`` in the main thread, like SIGINT's ``KeyboardInterrupt``: the
stack unwinds, ``with hook:`` blocks and the exit flush commit what is queued
(bounded by :data:`CLOSE_TIMEOUT` seconds), one line says so, and the process exits
with status 143. Only installed where the script left SIGTERM at its default.

**Forked children** (DataLoader workers, a ``multiprocessing`` fork) are not the
capturing process: :func:`in_forked_child` callbacks switch their copies of the
hooks off, and their exit (which runs ``threading``'s exit hooks too) closes nothing,
so a child never waits on the parent's writer thread or writes to its dump.

Examples
--------
>>> err = Terminated()  # what SIGTERM raises in the main thread
>>> isinstance(err, SystemExit), err.code
(True, 143)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from tdump._control import STOPPED_EXIT_CODE, StopRequest
from tdump.errors import TdumpError

__all__ = [
    "CLOSE_TIMEOUT",
    "SIGTERM_EXIT_CODE",
    "Terminated",
    "TrainingStopped",
    "at_exit",
    "exiting",
    "in_forked_child",
    "install_sigterm",
    "mark_exiting",
]

log = logging.getLogger("tdump.capture")

#: Seconds the writer gets to commit queued records after SIGTERM/SIGINT or at exit.
CLOSE_TIMEOUT = 20.0
#: Exit status after SIGTERM (128 + 15), as a shell reports a process SIGTERM killed.
SIGTERM_EXIT_CODE = 143

_CALLBACKS: list[Callable[[], None]] = []
_CHILD_CALLBACKS: list[Callable[[], None]] = []
_REGISTERED: list[bool] = []
_exiting = threading.Event()


class TrainingStopped(TdumpError, SystemExit):
    """Training ended because a stop request was found in the dump (docs/capture.md).

    The hook raises it from the model's forward call after committing the current
    record and closing the store. It is a :class:`SystemExit` with ``code`` 75
    (:data:`tdump._control.STOPPED_EXIT_CODE`), so an uncaught one ends the process
    with status 75; scripts that want to go on (evaluate, save) catch it.

    >>> err = TrainingStopped("accuracy fell")
    >>> err.code, isinstance(err, SystemExit), str(err)
    (75, True, 'accuracy fell')
    """

    def __init__(self, message: str, request: StopRequest | None = None) -> None:
        super().__init__(message)
        self.code = STOPPED_EXIT_CODE
        #: The stop request that was found.
        self.request = request


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM; exits with status 143 when uncaught."""

    def __init__(self) -> None:
        super().__init__(SIGTERM_EXIT_CODE)


def mark_exiting() -> None:
    """Note that the process is ending (SIGINT caught by ``tdump record``): closes are bounded."""
    _exiting.set()


def exiting() -> bool:
    """Whether the interpreter is exiting or a SIGTERM/SIGINT arrived (closing is bounded)."""
    return _exiting.is_set()


def _run() -> None:
    _exiting.set()
    while _CALLBACKS:
        fn = _CALLBACKS.pop()
        try:
            fn()
        except Exception as exc:  # pragma: no cover - interpreter shutdown
            log.error("tdump: closing at exit failed: %s: %s", type(exc).__name__, exc)


def at_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` at interpreter exit, before executors shut down (last registered first)."""
    _CALLBACKS.append(fn)
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    # Registered after concurrent.futures' own exit hook, so ours runs first (reverse order).
    import concurrent.futures.thread  # noqa: F401

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(_run)
    except RuntimeError:  # older Pythons, or already shutting down
        atexit.register(_run)


def in_forked_child(fn: Callable[[], None]) -> None:
    """Call ``fn`` in every process forked from this one, right after the fork.

    ``fn`` runs where only the forking thread survived: locks other threads held stay
    held, so it must only set flags and drop references.
    """
    _CHILD_CALLBACKS.append(fn)


def _forget_in_child() -> None:
    # The child's exit must not close the parent's hooks: their writer thread is the
    # parent's, and the dump is the parent's to write.
    _CALLBACKS.clear()
    with contextlib.suppress(ValueError):  # off the main thread; CPython makes the forker main
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # installed only over the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fn in _CHILD_CALLBACKS:
        fn()


os.register_at_fork(after_in_child=_forget_in_child)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _exiting.set()
    print("tdump: SIGTERM received: committing queued records, then exiting", file=sys.stderr)
    raise Terminated()


def install_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into :class:`Terminated` if the process left it at the default.

    Returns a function that restores the previous handler. A no-op outside the main
    thread or where the script installed its own handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: Any = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return lambda: None
    signal.signal(signal.SIGTERM, _on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore
