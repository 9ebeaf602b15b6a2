"""Checks of ``rank``'s arguments, and the step selection, before any dump is read.

Every mistake is one line from :mod:`tdump.errors`, naming the Python parameter and,
where ``tdump rank`` has one, its option (``layers / --layers``): these messages
reach users of both.

Examples
--------
>>> import numpy as np
>>> saved = np.array([0, 3, 7, 10])
>>> saved[parse_steps("0:10:2")(saved)].tolist()   # step numbers 0, 2, 4, ...: not every 2nd saved
[0]
>>> parse_steps("::0")
Traceback (most recent call last):
...
tdump.errors.SelectionError: invalid step stride 0; use a positive number
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tdump._names import MODES
from tdump.errors import ConfigError, SelectionError, check_choice

__all__ = ["StepsArg", "check_args", "describe_steps", "parse_steps"]

#: What ``steps=`` takes: a range text, a slice, a step number or step numbers (``None``: all).
StepsArg = str | slice | int | Sequence[int] | None

_STEPS_HELP = "use START:STOP (e.g. 100:2000), START:, :STOP, START:STOP:K or STEP"


def _step_bound(value: Any, what: str) -> int | None:
    """A slice bound or stride: ``None`` or an int (a bool or float is a mistake)."""
    if value is None or (isinstance(value, int | np.integer) and not isinstance(value, bool)):
        return None if value is None else int(value)
    raise SelectionError(
        f"invalid step {what} {value!r} ({type(value).__name__}); {_STEPS_HELP}, with integers"
    )


def parse_steps(steps: StepsArg) -> Callable[[np.ndarray], np.ndarray]:
    """Turn a step selection into a mask function over saved step numbers.

    ``"100:2000"`` keeps saved steps ``100 <= s < 2000`` (Python slice semantics,
    either end may be omitted); ``"500"`` or ``500`` keeps step 500; a ``slice`` or
    a list of step numbers works too. A stride ``K`` (``"START:STOP:K"``) keeps the
    saved steps whose **number** is ``START + n*K`` (``START`` omitted: 0), not every
    K-th saved step: with saved steps 0, 3, 7, ``"0:10:2"`` keeps step 0 only. ``K``
    must be positive.

    Raises :class:`~tdump.errors.SelectionError` for anything else (a zero or
    negative stride, a float, text that is not a range).

    >>> parse_steps("2:5")(np.arange(8)).nonzero()[0].tolist()
    [2, 3, 4]
    >>> parse_steps("1::3")(np.array([0, 1, 3, 4, 7, 9])).nonzero()[0].tolist()  # steps 1, 4, 7
    [1, 3, 4]
    """
    if steps is None:
        return lambda s: np.ones(s.shape, bool)
    if isinstance(steps, str):
        text = steps.strip()
        try:
            if ":" in text:
                parts = text.split(":")
                if len(parts) > 3:
                    raise ValueError(text)
                vals = [int(p) if p.strip() else None for p in parts]
                steps = slice(*vals)
            else:
                steps = int(text)
        except ValueError:
            raise SelectionError(f"invalid step range {text!r}; {_STEPS_HELP}") from None
    if isinstance(steps, slice):
        lo = _step_bound(steps.start, "start")
        hi = _step_bound(steps.stop, "stop")
        every = _step_bound(steps.step, "stride")
        if every is None:
            every = 1
        elif every <= 0:  # 0 would divide by zero; Python refuses a zero slice step too
            raise SelectionError(f"invalid step stride {every}; use a positive number")

        def mask(s: np.ndarray) -> np.ndarray:
            keep = np.ones(s.shape, bool)
            if lo is not None:
                keep &= s >= lo
            if hi is not None:
                keep &= s < hi
            # step numbers START, START+K, ...: the same steps whatever was saved in between
            return keep & ((s - (lo or 0)) % every == 0)

        return mask
    if isinstance(steps, int | np.integer) and not isinstance(steps, bool):
        return lambda s: s == int(steps)  # type: ignore[arg-type]
    if isinstance(steps, bool | float | bytes | Mapping) or not hasattr(steps, "__iter__"):
        raise SelectionError(
            f"invalid steps {steps!r} ({type(steps).__name__}); {_STEPS_HELP}, "
            "a slice or a list of step numbers"
        )
    items = list(steps)
    if any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in items):
        raise SelectionError(
            f"invalid steps {items!r}: a list of steps holds step numbers (integers) only"
        )
    wanted = np.asarray(items, dtype=np.int64)
    return lambda s: np.isin(s, wanted)


def describe_steps(steps: StepsArg) -> str:
    if isinstance(steps, slice):
        text = f"{'' if steps.start is None else steps.start}:{'' if steps.stop is None else steps.stop}"
        return text if steps.step is None else f"{text}:{steps.step}"
    return str(steps)


def check_args(
    dump: Any,
    criterion: Any,
    mode: Any,
    layers: Any,
    split_every: Any,
    connect_timeout: Any,
    progress: Any,
) -> None:
    """Refuse arguments of the wrong type or range with one line, before the dump is read."""
    if not isinstance(dump, str | os.PathLike):
        raise ConfigError(
            f"dump must be a path or URL (str or os.PathLike), got {type(dump).__name__} {dump!r}"
        )
    if not isinstance(criterion, str):
        raise ConfigError(
            f"criterion must be a criterion's name (e.g. 'taylor'), got {type(criterion).__name__}"
        )
    check_choice(mode, MODES, "mode")
    if layers is not None and not isinstance(layers, str):
        raise ConfigError(
            f"layers must be a regex (str) on conv module paths, got {type(layers).__name__}"
        )
    if isinstance(split_every, bool) or not isinstance(split_every, int | np.integer):
        raise ConfigError(f"split_every must be an int >= 2, got {type(split_every).__name__}")
    if split_every < 2:
        raise ConfigError(f"split_every must be at least 2, got {split_every}")
    if (
        isinstance(connect_timeout, bool)
        or not isinstance(connect_timeout, int | float)
        or not connect_timeout > 0
    ):
        raise ConfigError(
            f"connect_timeout / --timeout must be a positive number of seconds, got {connect_timeout!r}"
        )
    if not (isinstance(progress, bool) or callable(progress)):
        raise ConfigError(
            f"progress must be True, False or a callable f(done, total), got {type(progress).__name__}"
        )
