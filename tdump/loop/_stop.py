"""Whether the loop stops after a round, and why: ``--stop-when``, the stop checks, the
round count, or nothing left to prune.

Examples
--------
>>> from tdump.loop._settings import LoopSettings
>>> s = LoopSettings("train.py", [], rounds=2, count=4, stop_when="accuracy_drop > 0.1")
>>> def fail(r: int, stage: str, message: str) -> LoopError:
...     return LoopError(message)
>>> stop_reason(s, {"round": 1, "accuracy_drop": 0.2}, "d.zarr", fail, "exp")
'stop-when: accuracy_drop > 0.1 (accuracy_drop=0.2)'
>>> stop_reason(s, {"round": 1, "accuracy_drop": 0.0}, "d.zarr", fail, "exp")
'rounds: 2 of 2 done'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tdump.errors import ConfigError, LoopError
from tdump.loop._resume import resume_hint
from tdump.loop._settings import STOP_CHECKS, LoopSettings

__all__ = ["stop_reason"]


def stop_reason(
    s: LoopSettings,
    row: dict[str, Any],
    dump: str,
    fail: Callable[[int, str, str], LoopError],
    experiment: Path | str,
) -> str | None:
    """Why the loop stops after ``row``'s round, or ``None`` to go on.

    ``fail(round, stage, message)`` makes the error raised for a condition that cannot
    be evaluated, or a ``--count`` that round 0's model cannot give; ``experiment`` is
    the experiment's directory, for the ``--resume`` hint in those messages.
    """
    from tdump.loop._expr import parse_stop

    r = row["round"]
    if s.stop_when:
        cond = parse_stop(s.stop_when)
        values = {
            k: row.get(k)
            for k in ("accuracy", "accuracy_drop", "params_ratio", "flops_ratio", "loss")
        }
        values["round"] = r
        try:
            fired = cond.evaluate(values)
        except ConfigError as exc:  # round r's row is kept: a new condition can decide
            have = ", ".join(n for n in sorted(values) if values[n] is not None)
            raise fail(
                r,
                "measure",
                f"{exc} and start a new experiment, or go on with this one: "
                f"{resume_hint(experiment, s)} --stop-when EXPR (over what its rounds "
                f"have: {have}), or --stop-when '' for no condition",
            ) from None
        if fired:
            shown_values = ", ".join(f"{n}={_fmt(values[n])}" for n in sorted(cond.names))
            return f"stop-when: {s.stop_when} ({shown_values})"
    for name in s.stop_checks:
        reason = STOP_CHECKS[name](row, dump)
        if reason:
            return f"{name}: {reason}"
    if r + 1 >= s.rounds:
        return f"rounds: {s.rounds} of {s.rounds} done"
    per_layer = s.scope == "per-layer"
    prunable = row.get("prunable_per_group" if per_layer else "prunable")
    if s.count is not None and prunable is not None and s.count > prunable:
        what = (
            f"--count {s.count} (per group with --scope per-layer) is more than the "
            f"{prunable} channels any one group can lose in one round"
            if per_layer
            else f"--count {s.count} is more than the {prunable} channels one round can prune"
        )
        message = (
            f"{what} from round {r}'s model (only convs that --criterion {s.criterion} can score "
            f"from round {r}'s dump are ranked, the others keep their channels; each "
            f"layer keeps --min-channels {s.min_channels}"
            + (
                f" and loses at most --max-ratio {s.prune_max_ratio()} of its channels"
                if s.prune_max_ratio() is not None
                else ""
            )
            + ("; residual groups are left alone" if s.conv_only_groups else "")
            + ")"
        )
        if r == 0:
            raise fail(r, "measure", message + "; lower --count or use --ratio")
        return f"nothing left to prune: {message}"
    return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
