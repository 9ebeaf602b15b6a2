"""One console for all command output, and :func:`abort` for one-line errors."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console

__all__ = ["abort", "console", "err_console"]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def abort(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit with ``code``.

    Examples
    --------
    >>> abort("no dump at ./x.zarr; check the path")  # doctest: +SKIP
    """
    from rich.markup import escape  # messages quote user text and `pip install 'x[y]'`

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)
