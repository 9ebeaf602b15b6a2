"""One error tree for tdump.

Every error tdump raises on purpose is a :class:`TdumpError`. Each subclass also
inherits the builtin it refines (``FileNotFoundError``, ``ValueError``, ...), so
callers that already catch builtins keep working. Messages are one line: what was
found, then how to fix it.

Examples
--------
>>> from tdump.errors import NotADumpError, TdumpError
>>> issubclass(NotADumpError, ValueError) and issubclass(NotADumpError, TdumpError)
True
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptStoreError",
    "DumpNotFoundError",
    "FormatVersionError",
    "LoopError",
    "MissingDependencyError",
    "MissingTensorError",
    "NonFiniteWarning",
    "NotADumpError",
    "RanksError",
    "SelectionError",
    "TdumpError",
    "UntraceableModelError",
    "compile_regex",
]


class TdumpError(Exception):
    """Base class of every error tdump raises deliberately."""


class DumpNotFoundError(TdumpError, FileNotFoundError):
    """A path or URL that should hold a dump (or checkpoint) does not exist."""


class NotADumpError(TdumpError, ValueError):
    """The path exists but is not a tdump store."""


class FormatVersionError(TdumpError, ValueError):
    """The file was written by a newer (or unknown) format version."""


class CorruptStoreError(TdumpError, ValueError):
    """A file of the store is damaged: it does not decode to what its metadata says."""


class SelectionError(TdumpError, ValueError):
    """An include/exclude regex is invalid or selects nothing."""


class ConfigError(TdumpError, ValueError):
    """Invalid settings (hook configuration, CLI options, config files)."""


class MissingDependencyError(TdumpError, ImportError):
    """An optional package a URL or feature needs is not installed; the message says which extra."""


class MissingTensorError(TdumpError, LookupError):
    """A tensor, step or mode asked for is not in the dump."""

    def __str__(self) -> str:  # LookupError subclasses would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class RanksError(TdumpError, ValueError):
    """A ranks table is malformed or does not match the model."""


class CheckpointError(TdumpError, ValueError):
    """A checkpoint cannot be loaded safely or does not match the architecture."""


class LoopError(TdumpError, RuntimeError):
    """The pruning loop cannot start or go on (a stage failed, the experiment is in use, ...).

    ``exit_code`` is what ``tdump loop`` exits with (a failed training script's own code).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UntraceableModelError(TdumpError, RuntimeError):
    """torch.fx could not trace the model; the message names the module."""


class NonFiniteWarning(UserWarning):
    """Data holds NaN or Inf (e.g. a diverged run): results leave it out or are NaN."""


def compile_regex(regex: str | None, what: str = "regex") -> re.Pattern[str] | None:
    """Compile a user's selection regex (``None`` stays ``None``).

    Raises :class:`SelectionError` ``invalid <what> '<regex>': <reason>`` when it does
    not compile.

    >>> compile_regex("relu").search("layer1.0.relu.output_0") is not None
    True
    """
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as exc:
        raise SelectionError(f"invalid {what} {regex!r}: {exc}") from None
