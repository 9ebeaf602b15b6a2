"""Validation of hook settings: every field of ``HookConfig`` and ``CollectionConfig``.

Settings arrive from JSON and YAML (``tdump record --config``, ``TDUMP_CONFIG``) and
from keyword arguments, so any field may hold any type. Each is checked here, when
the config is made, into a one-line :class:`~tdump.errors.ConfigError` that names the
field, what was given and what is expected: a wrong type must not surface later as a
traceback from inside the hook, nor a negative step be accepted and never saved.

Examples
--------
>>> from tdump.capture import HookConfig
>>> HookConfig(save_steps=[3, -1])
Traceback (most recent call last):
...
tdump.errors.ConfigError: save_steps must hold steps >= 0 (steps count from 0), not -1
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tdump.errors import ConfigError, compile_regex

if TYPE_CHECKING:
    from tdump.capture._config import CollectionConfig, HookConfig

__all__ = ["check_collection", "check_hook"]

MODES: tuple[str, ...] = ("train", "eval", "predict")
#: Compression levels each codec accepts after ``:``, as the codecs do (checked against
#: numcodecs 0.16 and zarr 3.1): Blosc (``numcodecs.Blosc``, zarr's ``BloscCodec``) fails
#: at the first encode outside 0-9 ("error during blosc compression: -10"); zstd takes
#: ``ZSTD_minCLevel()`` (-131072) to 22, and zarr's ``ZstdCodec`` refuses more than 22.
_LEVELS: dict[str, tuple[int, int]] = {
    "zstd": (0, 9),
    "lz4": (0, 9),
    "lz4-noshuffle": (0, 9),
    "zstd-plain": (-131072, 22),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    # numpy integers count; bool is an int to Python but never meant as a number here
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(field: str, value: Any, minimum: int, *, optional: bool = False, hint: str = "") -> Any:
    """``value`` as an int ``>= minimum`` (``None`` if ``optional``), else a ConfigError."""
    if value is None and optional:
        return None
    expected = "a positive integer" if minimum == 1 else "an integer"
    if not _is_int(value):
        raise ConfigError(f"{field} must be {expected}, not {_shown(value)}")
    if value < minimum:
        if minimum == 1:
            raise ConfigError(f"{field} must be a positive integer{hint}, not {int(value)}")
        raise ConfigError(f"{field} must be >= {minimum}{hint}, not {int(value)}")
    return int(value)


def as_bool(field: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is a bool (or ``None`` and ``optional``), else a ConfigError."""
    if (value is None and optional) or isinstance(value, bool):
        return value
    raise ConfigError(f"{field} must be true or false, not {_shown(value)}")


def as_choice(field: str, value: Any, choices: Iterable[str], *, optional: bool = False) -> Any:
    """``value`` if it is one of ``choices`` (or ``None`` and ``optional``), else a ConfigError."""
    choices = tuple(choices)
    if (value is None and optional) or (isinstance(value, str) and value in choices):
        return value
    none = " or null" if optional else ""
    raise ConfigError(f"unknown {field} {_shown(value)}; use one of {', '.join(choices)}{none}")


def as_regex(field: str, value: Any) -> Any:
    """``value`` if it is ``None`` or a regex that compiles (SelectionError if it does not)."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{field} must be a regex (a string) or null, not {_shown(value)}")
    compile_regex(value, field)
    return value


def as_steps(field: str, value: Any) -> tuple[int, ...] | None:
    """``value`` (a list of steps) as a tuple of ints ``>= 0``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{field} must be a list of steps (integers >= 0, e.g. [0, 50, 100]), "
            f"not {_shown(value)}"
        )
    steps = tuple(value)
    for s in steps:
        if not _is_int(s):
            raise ConfigError(f"{field} must hold integer steps, not {_shown(s)}")
        if s < 0:
            raise ConfigError(f"{field} must hold steps >= 0 (steps count from 0), not {int(s)}")
    return tuple(int(s) for s in steps)


def _compression(value: Any) -> str:
    from tdump.capture._config import COMPRESSIONS

    if not isinstance(value, str):
        raise ConfigError(
            f"compression must be a string such as 'auto' or 'zstd:3', not {_shown(value)}"
        )
    codec, colon, level = value.partition(":")
    if codec not in COMPRESSIONS:
        levels = ", ".join(f"{c} {lo} to {hi}" for c, (lo, hi) in _LEVELS.items())
        raise ConfigError(
            f"unknown compression {value!r}; use one of {', '.join(COMPRESSIONS)}, or "
            f"name:level such as 'zstd:3' (levels: {levels})"
        )
    if colon:
        if codec not in _LEVELS:
            raise ConfigError(f"compression {value!r}: {codec} takes no level; pass {codec!r}")
        lo, hi = _LEVELS[codec]
        digits = level.removeprefix("-")
        ok = digits.isascii() and digits.isdigit() and lo <= int(level) <= hi
        if not ok:
            raise ConfigError(
                f"compression {value!r}: the level of {codec} must be an integer "
                f"from {lo} to {hi}, not {level!r}"
            )
    return value


def _mode_intervals(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f'mode_save_interval must map modes to intervals (e.g. {{"eval": 1}}), '
            f"not {_shown(value)}"
        )
    out: dict[str, int] = {}
    for mode, n in value.items():
        mode = as_choice("mode in mode_save_interval", mode, MODES)
        out[mode] = as_int(f"mode_save_interval[{mode!r}]", n, 1)
    return out


def check_hook(cfg: HookConfig) -> dict[str, Any]:
    """Check every field of ``cfg``; return the fields whose values are normalized.

    Returns
    -------
    dict
        Field name -> the value to store instead (tuples for lists, ints for numpy
        integers, ``str`` for a path); the caller sets them on the frozen config.

    Raises
    ------
    ConfigError
        The first field that is wrong, in one line (SelectionError for a regex that
        does not compile).
    """
    from tdump.capture._config import REDUCTIONS, STORAGE_DTYPES, WRITE_MODES

    out = cfg.out
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if not isinstance(out, str) or not out:
        raise ConfigError(
            f"out must be a store path or URL (a string or os.PathLike, e.g. 'run.zarr'), "
            f"not {_shown(out)}"
        )
    fixed: dict[str, Any] = {
        "out": out,
        "write_mode": as_choice("write_mode", cfg.write_mode, WRITE_MODES),
        "include_regex": as_regex("include_regex", cfg.include_regex),
        "exclude_regex": as_regex("exclude_regex", cfg.exclude_regex),
        "include_activations": as_bool("include_activations", cfg.include_activations),
        "save_interval": as_int("save_interval", cfg.save_interval, 1),
        "save_steps": as_steps("save_steps", cfg.save_steps),
        "start_step": as_int("start_step", cfg.start_step, 0, optional=True),
        "end_step": as_int("end_step", cfg.end_step, 1, optional=True),
        "compression": _compression(cfg.compression),
        "storage_dtype": as_choice(
            "storage_dtype", cfg.storage_dtype, STORAGE_DTYPES, optional=True
        ),
        "reduction": as_choice("reduction", cfg.reduction, REDUCTIONS, optional=True),
        "strict": as_bool("strict", cfg.strict),
        "mode": as_choice("mode", cfg.mode, MODES, optional=True),
        "mode_save_interval": _mode_intervals(cfg.mode_save_interval),
        "step_source": as_choice("step_source", cfg.step_source, ("forward", "optimizer")),
        "queue_size": as_int("queue_size", cfg.queue_size, 1),
        "writer_threads": as_int(
            "writer_threads", cfg.writer_threads, 0, hint=" (0 picks a number from the CPUs)"
        ),
        "rank": as_int("rank", cfg.rank, 0, optional=True),
        "world_size": as_int("world_size", cfg.world_size, 1, optional=True),
    }
    start, end = fixed["start_step"], fixed["end_step"]
    if start is not None and end is not None and end <= start:
        raise ConfigError(
            f"end_step ({end}) must be greater than start_step ({start}): "
            "steps are saved in [start_step, end_step)"
        )
    rank, world = fixed["rank"], fixed["world_size"]
    if rank is not None and world is not None and rank >= world:
        raise ConfigError(f"rank ({rank}) must be below world_size ({world})")
    return {k: v for k, v in fixed.items() if v is not getattr(cfg, k)}


def check_collection(cc: CollectionConfig) -> dict[str, Any]:
    """Check every field of a collection override; return the normalized fields."""
    from tdump.capture._config import COLLECTIONS

    if not isinstance(cc.name, str) or cc.name not in COLLECTIONS:
        raise ConfigError(
            f"unknown collection {_shown(cc.name)}; use one of {', '.join(COLLECTIONS)}"
        )
    of = f"of collection {cc.name}"
    fixed = {
        "enabled": as_bool(f"enabled {of}", cc.enabled),
        "include_regex": as_regex(f"include_regex {of}", cc.include_regex),
        "save_all": as_bool(f"save_all {of}", cc.save_all, optional=True),
        "save_interval": as_int(f"save_interval {of}", cc.save_interval, 1, optional=True),
        "save_steps": as_steps(f"save_steps {of}", cc.save_steps),
    }
    return {k: v for k, v in fixed.items() if v is not getattr(cc, k)}
