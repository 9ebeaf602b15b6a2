"""``tdump.report(accuracy=..., loss=...)``: metrics from a training script into its dump.

The one line a script adds so that ``tdump loop`` (or any reader) sees its metrics.
Each call writes one record of mode ``global`` holding ``scalars.<name>`` for every
keyword, through every active hook (the one ``tdump record`` or
``tdump.capture.auto`` installed, or the script's own :class:`~tdump.capture.Hook`).
Its step is the number of earlier reports of that hook, so ``global`` step ``k`` is
the ``k``-th report; a hook that appends to a dump (``write_mode="append"``,
``tdump record --append``) goes on from the dump's last ``global`` step. Without an
active hook it does nothing, prints nothing and never raises: the same script runs
with and without capture.

Examples
--------
>>> import torch, tdump
>>> from tdump.capture import Hook
>>> model = torch.nn.Linear(2, 2)
>>> with Hook("memory://doc/report.zarr", save_interval=1) as hook:
...     _ = hook.register_module(model)
...     tdump.report(accuracy=0.75, loss=0.5)
>>> tdump.Trial("memory://doc/report.zarr").scalar("accuracy", mode="global")
{0: 0.75}
>>> tdump.report(accuracy=1.0)  # no hook: a no-op
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any

__all__ = ["report"]

log = logging.getLogger("tdump.capture")
_REPORTS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def report(**metrics: float) -> None:
    """Save each keyword as the scalar ``scalars.<name>`` (mode ``global``) of the active hook(s).

    Parameters
    ----------
    **metrics
        Numbers (Python floats, ints, 0-d tensors, numpy scalars). Non-numbers and
        non-finite values are skipped with one log line.

    Examples
    --------
    >>> report(accuracy=0.91, loss=0.32)  # doctest: +SKIP
    """
    try:
        _report(metrics)
    except Exception as exc:  # capture never crashes training
        log.error("tdump.report failed (training goes on): %s: %s", type(exc).__name__, exc)


def _report(metrics: dict[str, Any]) -> None:
    from tdump.capture._hook import active_hooks

    hooks = active_hooks()
    if not hooks or not metrics:
        return
    import torch

    from tdump._format import scalar_name
    from tdump.capture._writer import PendingRecord

    values: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            log.error("tdump.report: %s=%r is not a number; skipped", name, value)
            continue
        if math.isfinite(number):
            values[name] = number
        else:
            log.error("tdump.report: %s=%r is not finite; skipped", name, number)
    for hook in hooks:
        if not hook._enabled:
            continue
        step = _REPORTS.get(hook)
        if step is None:
            step = _first_step(hook)
        rec = PendingRecord("global", step)
        for name, number in values.items():
            sname = scalar_name(name)
            if hook.config.selects(sname, "scalars"):
                attrs = {"collection": "scalars", "kind": "scalar", "module": ""}
                rec.add(sname, torch.tensor(number), dims=(), attrs=attrs)
        if rec.entries:
            _REPORTS[hook] = step + 1
            rec.wall_time = hook.clock()
            hook._submit(rec)


def _first_step(hook: Any) -> int:
    """The ``global`` step of ``hook``'s first report: 0, or where an appended dump goes on.

    An appending hook's records follow the dump's committed ones, whose ``global``
    steps must keep increasing (readers refuse a dump whose steps do not).
    """
    existing = getattr(hook, "_existing", None)
    if existing is None:
        return 0
    return int(existing.next_steps.get("global", 0))
