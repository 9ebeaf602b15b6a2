"""Running ``tdump ARGS`` in the test's own process, through the console-script entry point."""

from __future__ import annotations

import sys

import pytest


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``tdump ARGS`` via :func:`tdump.cli.app.main`: exit code, stdout, stderr."""
    from tdump.cli.app import main

    monkeypatch.setattr(sys, "argv", ["tdump", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
