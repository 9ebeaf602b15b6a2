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
from collections.abc import Iterable, Sequence

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
    "check_choice",
    "compile_regex",
    "did_you_mean",
    "first_line",
    "listed",
    "needs_no_score",
    "pruned_with_clause",
]


class TdumpError(Exception):
    """Base class of every error tdump raises deliberately."""


class DumpNotFoundError(TdumpError, FileNotFoundError):
    """A path or URL that should hold a dump (or checkpoint) does not exist."""


class NotADumpError(TdumpError, ValueError):
    """The path exists but is not a tdump store."""


class FormatVersionError(TdumpError, ValueError):
    """The file was written by a newer (or unknown) format version."""


class CorruptStoreError(NotADumpError):
    """A file of the store is damaged: a chunk does not decode to what its metadata says.

    A :class:`NotADumpError` (a damaged store is not a readable dump), so ``except
    NotADumpError`` catches it whichever reader (``rank``, ``open_dump``, ``Trial``)
    met the damage.
    """


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


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close.

    ``word`` that is not a string is close to nothing.

    >>> did_you_mean("conv1.wieght", ["conv1.weight", "conv2.bias"])
    "; did you mean 'conv1.weight'?"
    >>> did_you_mean(None, ["conv1.weight"])
    ''
    """
    if not isinstance(word, str):
        return ""
    import difflib  # only when a name is wrong

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def listed(names: Sequence[str], most: int) -> str:
    """The first ``most`` of ``names``, comma-separated, and how many more there are.

    >>> listed(["a", "b", "c", "d", "e"], 3)
    'a, b, c and 2 more'
    >>> listed(["a", "b"], 3)
    'a, b'
    """
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_choice(value: object, choices: Sequence[str], what: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise :class:`ConfigError`.

    The message names the choices and the closest one: a misspelt mode or collection
    fails at once instead of selecting nothing.

    >>> check_choice("eval", ("train", "eval"), "mode")
    'eval'
    >>> check_choice("evl", ("train", "eval"), "mode")
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: unknown mode 'evl'; use one of train, eval; did you mean 'eval'?
    """
    if isinstance(value, str) and value in choices:
        return value
    shown = repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    raise ConfigError(
        f"unknown {what} {shown}; use one of {', '.join(choices)}{did_you_mean(value, choices)}"
    )


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut at ``limit``.

    What tdump's one-line errors quote of an exception raised below them (zarr, torch,
    a user's builder), so that a multi-line message cannot break the one line.

    >>> first_line(ValueError("bad size\\nmore detail"))
    'bad size'
    >>> first_line(KeyError()), first_line(RuntimeError("x" * 50), limit=10)
    ('KeyError', 'xxxxxxxxxx')
    """
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if limit is None else line[:limit]


def pruned_with_clause(whom: str, count: int, scored: Sequence[str]) -> str:
    """How ``tdump prune`` treats ``count`` unscored layers (``whom``) whose channels it
    shares with ``scored`` layers: rank's notes and the loop's say it in these words.

    >>> pruned_with_clause("it", 1, ["conv2"])
    'prunes it with the scored layer whose channels it shares (conv2)'
    >>> pruned_with_clause("them", 2, ["a", "b", "c", "d"])
    'prunes them with the scored layers whose channels they share (a, b, c and 1 more)'
    """
    noun = "layer" if len(scored) == 1 else "layers"
    share = "it shares" if count == 1 else "they share"
    return f"prunes {whom} with the scored {noun} whose channels {share} ({listed(scored, 3)})"


def needs_no_score(count: int) -> str:
    """``it needs no score of its own`` (``count`` 1), else the plural."""
    return "it needs no score of its own" if count == 1 else "they need no score of their own"
