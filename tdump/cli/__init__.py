"""The ``tdump`` command line: one small module per command, thin over the library."""

from tdump.cli.app import app, main

__all__ = ["app", "main"]
