"""Helpers for tests that start processes and signal them."""

from __future__ import annotations

import signal

__all__ = ["default_sigint"]


def default_sigint() -> None:
    """``preexec_fn`` for a child that must see Ctrl-C (SIGINT) as a terminal sends it.

    A suite started in the background of a non-interactive shell inherits SIGINT
    ignored, and so would its children: Python then never raises KeyboardInterrupt,
    and a test waiting for the child's reaction would wait forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
