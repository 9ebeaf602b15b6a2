"""Names, constants and small checks of the store contract (``docs/FORMAT.md``).

Shared by the writer (:mod:`tdump._format`) and the reader (:mod:`tdump._store_reader`);
imports neither zarr nor torch.

>>> encode_name("layer1.0/relu"), rank_group(3), check_mode("eval")
('layer1.0%2Frelu', 'rank3', 'eval')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tdump.errors import ConfigError, FormatVersionError, NotADumpError

if TYPE_CHECKING:
    import zarr

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODES",
    "READ_VERSIONS",
    "RECORD_CHUNK",
    "attr_dict",
    "check_format",
    "check_mode",
    "committed_count",
    "decode_name",
    "dump_path",
    "encode_name",
    "grad_name",
    "input_name",
    "no_mode_steps",
    "output_name",
    "rank_group",
    "scalar_name",
    "validate_name",
]

FORMAT_NAME = "tdump.store"
FORMAT_VERSION = 2
#: Store format versions this tdump reads (docs/FORMAT.md: 2 adds shard files).
READ_VERSIONS = (1, 2)
#: Modes in the order readers list them. A mode has its own step counter.
MODES: tuple[str, ...] = ("train", "eval", "predict", "global")
#: Rows per chunk of the small ``records/*`` arrays (each commit rewrites one chunk atomically).
RECORD_CHUNK = 1024
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")


def output_name(module: str, call: int) -> str:
    """Name of the output of call ``call`` (0-based, per forward) of ``module``.

    >>> output_name("layer1.0.relu", 1)
    'layer1.0.relu.output_1'
    """
    return f"{module}.output_{call}"


def input_name(module: str, call: int, arg: int) -> str:
    """Name of positional input ``arg`` of call ``call`` of ``module`` (loss inputs).

    >>> input_name("loss", 0, 1)
    'loss.input_0.1'
    """
    return f"{module}.input_{call}.{arg}"


def grad_name(name: str) -> str:
    """Name of the gradient of the loss w.r.t. the tensor called ``name``.

    >>> grad_name("layer1.0.conv1.weight")
    'layer1.0.conv1.weight.grad'
    """
    return f"{name}.grad"


def scalar_name(name: str) -> str:
    """Name under which ``hook.save_scalar(name, value)`` is stored.

    >>> scalar_name("lr")
    'scalars.lr'
    """
    return f"scalars.{validate_name(name)}"


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a tensor (any non-empty string), else raise :class:`ConfigError`.

    Names are stored under :func:`encode_name` keys, so any legal PyTorch module name works.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"tensor name {name!r} is empty; name the tensor")
    return name


def encode_name(name: str) -> str:
    """The store key of tensor ``name``: reversible, one path segment, inside the store.

    Characters other than ASCII letters, digits, ``_``, ``-`` and ``.`` (and ``%``
    itself) become ``%XX`` per UTF-8 byte, as do a leading ``-`` or ``.``, a ``.``
    after a ``.`` and a trailing ``.``; so no key holds ``/``, ``..`` or a hidden
    name, and names made of safe characters are their own keys (docs/FORMAT.md,
    "Tensor names").

    >>> encode_name("blocks.a/b.weight"), encode_name("hé.x y"), encode_name("..")
    ('blocks.a%2Fb.weight', 'h%C3%A9.x%20y', '%2E%2E')
    >>> decode_name(encode_name("blocks.a/b..c")) == "blocks.a/b..c"
    True
    """
    validate_name(name)
    if name == "zarr.json":
        return "zarr%2Ejson"  # the group's own metadata document
    out: list[str] = []
    last = len(name) - 1
    for i, ch in enumerate(name):
        unsafe = (
            ch not in _SAFE
            or (i == 0 and ch in "-.")
            or (ch == "." and (i == last or name[i - 1] == "."))
        )
        out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")) if unsafe else ch)
    return "".join(out)


def decode_name(key: str) -> str:
    """The tensor name stored under ``key`` (inverse of :func:`encode_name`)."""
    if "%" not in key:
        return key
    from urllib.parse import unquote

    return unquote(key, errors="strict")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def no_mode_steps(path: object, mode: str, present: Iterable[str]) -> str:
    """The one wording of "``path`` has no saved steps of ``mode``", naming the modes it has.

    >>> no_mode_steps("d.zarr", "evl", ["eval", "train"])
    "d.zarr has no saved 'evl' steps; modes present: train, eval"
    """
    have = set(present)
    ordered = [m for m in MODES if m in have] + sorted(have.difference(MODES))
    return f"{path} has no saved {mode!r} steps; modes present: {', '.join(ordered) or 'none'}"


def rank_group(rank: int) -> str:
    return f"rank{rank}"


def attr_dict(value: Any) -> dict[str, Any]:
    """``value`` as a dict when it is a mapping (JSON attributes), else empty."""
    return dict(value) if isinstance(value, Mapping) else {}


def committed_count(step: zarr.Array) -> int:
    """Length of the leading run of committed rows (``step != -1``)."""
    n = step.shape[0]
    for start in range(0, n, RECORD_CHUNK):
        block = np.asarray(step[start : min(n, start + RECORD_CHUNK)])
        missing = np.flatnonzero(block == -1)
        if missing.size:
            return start + int(missing[0])
    return n


def check_format(path: str, meta: Any) -> int:
    """The store format version of root attributes ``meta``; refuses what is not a readable dump."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise NotADumpError(
            f"{path} is a Zarr group that tdump did not write; point at a dump made by `tdump record`"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version not in READ_VERSIONS:
        raise FormatVersionError(
            f"{path} has store format version {version}, this tdump reads up to {FORMAT_VERSION}; "
            "upgrade tdump (pip install -U tdump)"
        )
    return version


def dump_path(path: object, what: str = "the dump") -> str:
    """``path`` as a string if it is a ``str`` or ``os.PathLike``, else a one-line :class:`ConfigError`.

    >>> dump_path(42)
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: the dump must be a path or URL (str or os.PathLike), got int 42
    """
    if isinstance(path, str | os.PathLike):
        fs = os.fspath(path)
        if isinstance(fs, str):
            return fs
    raise ConfigError(
        f"{what} must be a path or URL (str or os.PathLike), got {type(path).__name__} {path!r}"
    )
