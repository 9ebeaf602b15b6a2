"""The typer application. Commands live in their own modules; heavy imports happen inside them."""

from __future__ import annotations

import gc

import typer

from tdump._version import __version__
from tdump.cli import (
    cmd_check,
    cmd_experiments,
    cmd_loop,
    cmd_ls,
    cmd_prune,
    cmd_rank,
    cmd_record,
)
from tdump.cli._console import abort, console
from tdump.errors import TdumpError

__all__ = ["app", "main"]

app = typer.Typer(
    name="tdump",
    help="Capture tensors from training into Zarr, rank conv filters with Dask, prune checkpoints.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"tdump {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tdump: record -> rank -> prune, each stage its own process."""


cmd_record.register(app)
cmd_ls.register(app)
cmd_rank.register(app)
cmd_prune.register(app)
cmd_check.register(app)
cmd_loop.register(app)
cmd_experiments.register(app)


def _interrupted(exc: SystemExit) -> bool:
    """Whether typer turned Ctrl-C into this exit (it raises ``Exit(130)`` from the
    KeyboardInterrupt, then exits); a command's own ``abort(..., 130)`` is not this."""
    inner = exc.__context__
    return isinstance(inner, typer.Exit) and isinstance(inner.__cause__, KeyboardInterrupt)


def main() -> None:
    """Console-script entry point: run the app, turning tdump errors into one-line messages."""
    try:
        app()
    except TdumpError as exc:
        abort(str(exc))
    except KeyboardInterrupt:
        abort("interrupted", code=130)
    except SystemExit as exc:
        if exc.code == 130 and _interrupted(exc):
            abort("interrupted", code=130)
        raise
    finally:
        # Why: the interpreter's last collection at exit walks every object pandas,
        # pyarrow, dask and zarr created (0.15 s of a cold `tdump rank` on 2 cores).
        # Frozen objects are skipped; atexit handlers and open files are unaffected.
        gc.freeze()
