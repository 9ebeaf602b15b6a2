"""What the loop tells its caller as it runs (:class:`LoopEvents`; the CLI draws a live table)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["LoopEvents"]


class LoopEvents:
    """What the loop tells its caller; the default prints one line per stage."""

    def stage_started(self, r: int, stage: str, command: str | None) -> None:
        """A stage begins (``command`` is its shell line, ``None`` for in-process stages)."""
        if command:
            print(f"$ {command}", flush=True)

    def stage_finished(self, r: int, stage: str, seconds: float) -> None:
        """A stage completed."""
        print(f"round {r} {stage:<8} {seconds:7.1f} s", flush=True)

    def round_finished(self, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """A round's row was written (``rows``: every row so far)."""

    def stage_note(self, r: int, stage: str, line: str) -> None:
        """A ``note: ...`` or ``warning: ...`` line the stage's process wrote to its log."""
        print(f"round {r} {stage}: {line}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """Something the user should know."""
        print(f"note: {text}", file=sys.stderr, flush=True)
