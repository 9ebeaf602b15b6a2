"""The loop's settings (stored in ``experiment.json``) and the stop-check registry.

Examples
--------
>>> s = LoopSettings(script="train.py", rounds=3, count=8)
>>> s.to_dict()["rounds"], LoopSettings.from_dict(s.to_dict()) == s
(3, True)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tdump.errors import ConfigError

__all__ = [
    "RECORD_CONFIG",
    "STOP_CHECKS",
    "TAYLOR_CRITERIA",
    "TAYLOR_INCLUDE",
    "LoopSettings",
    "StopCheck",
    "record_options",
    "register_stop_check",
]

#: A stop check: ``(row, dump_path) -> reason`` (``None``: go on). ``row`` is the
#: round's row as written to rounds.jsonl (metrics, params, ...).
StopCheck = Callable[[Mapping[str, Any], str], "str | None"]

#: Named stop checks the loop can run after each round (``LoopSettings.stop_checks``):
#: the place where rules over dumps (``tdump.analyze.check``) plug in.
STOP_CHECKS: dict[str, StopCheck] = {}


def register_stop_check(name: str, check: StopCheck) -> None:
    """Make ``check`` usable as ``LoopSettings(stop_checks=[name])``.

    Examples
    --------
    >>> register_stop_check("tiny", lambda row, dump: "tiny model" if row["params"] < 10 else None)
    >>> STOP_CHECKS["tiny"]({"params": 5}, "dump.zarr")
    'tiny model'
    """
    STOP_CHECKS[name] = check


@dataclass
class LoopSettings:
    """Everything ``tdump loop`` was asked to do (docs/loop.md lists the options)."""

    script: str
    train_args: list[str] = field(default_factory=list)
    rounds: int = 3
    count: int | None = None
    ratio: float | None = None
    criterion: str = "taylor"
    scope: str = "global"
    min_channels: int = 1
    max_ratio: float | None = None
    conv_only_groups: bool = False
    stop_when: str | None = None
    stop_checks: list[str] = field(default_factory=list)
    init: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    include: str | None = None
    interval: int = 100
    full_tensors: bool = False
    input_shape: list[int] | None = None
    scheduler: str = "threads"
    workers: int | None = None
    mlflow: bool = False

    def check(self) -> None:
        """One-line :class:`ConfigError` for settings that cannot work (before any stage runs)."""
        from tdump.loop._expr import parse_stop

        if not os.path.isfile(self.script):
            raise ConfigError(f"no training script at {self.script}; check the path")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.rounds > 1 and (self.count is None) == (self.ratio is None):
            raise ConfigError("give exactly one of --count and --ratio (what each round prunes)")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"--count must be a positive number of channels, got {self.count}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"--ratio must be between 0 and 1, got {self.ratio}")
        if self.interval < 1:
            raise ConfigError(f"--interval must be a positive number of steps, got {self.interval}")
        if self.init is not None and not os.path.isfile(self.init):
            raise ConfigError(f"no checkpoint at --init {self.init}; check the path")
        if self.stop_when:
            parse_stop(self.stop_when)
        for name in self.stop_checks:
            if name not in STOP_CHECKS:
                known = ", ".join(sorted(STOP_CHECKS)) or "none registered"
                raise ConfigError(f"unknown stop check {name!r}; known: {known}")

    def prune_max_ratio(self) -> float | None:
        """The ``--max-ratio`` each prune stage applies (``tdump prune``'s default if unset).

        Examples
        --------
        >>> LoopSettings(script="t.py").prune_max_ratio(), LoopSettings(script="t.py", scope="per-layer").prune_max_ratio()
        (0.8, None)
        """
        from tdump.surgery._plan import resolve_max_ratio

        return resolve_max_ratio(self.max_ratio, self.scope)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``experiment.json``'s ``settings``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopSettings:
        """Settings from :meth:`to_dict` (unknown keys from newer writers are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: What ``tdump record`` saves besides the ``--include`` selection: losses and loss
#: inputs at every step, so accuracy can come from logits and labels without code.
RECORD_CONFIG: dict[str, Any] = {
    "collections": [
        {"name": "losses", "save_interval": 1},
        {"name": "loss_inputs", "save_interval": 1},
    ]
}


#: Criteria that rank from a per-example, per-channel reduction alone: with them the
#: loop records just that, at the source (a few KB per layer and step), unless
#: ``full_tensors``: the Taylor term, or the fraction of zeros ``apoz`` averages.
SOURCE_REDUCTIONS = {"taylor": "taylor", "taylor-signed": "taylor", "apoz": "zero_fraction"}
TAYLOR_CRITERIA = frozenset(c for c, r in SOURCE_REDUCTIONS.items() if r == "taylor")
#: What the loop records for a Taylor criterion when ``--include`` is not given: the
#: activations of ``tdump record``'s default selection (with ``include_activations``,
#: activation modules whatever their names), without the parameters.
TAYLOR_INCLUDE = ".*relu"


def record_options(settings: LoopSettings) -> tuple[str | None, dict[str, Any]]:
    """The ``--include`` (``None``: record's default) and ``--config`` of the train stage.

    Losses and loss inputs at every step (for the metrics). With a Taylor criterion
    or ``apoz``, only what ranking reads: the per-example Taylor term (or fraction of
    zeros) of the ReLU outputs (or of what ``settings.include`` selects) instead of
    full activations, their gradients and the parameters. ``settings.full_tensors`` records ``tdump record``'s usual
    full tensors instead, for stop checks or analyses that read them.

    Examples
    --------
    >>> record_options(LoopSettings(script="t.py"))
    ('.*relu', {'collections': [...], 'reduction': 'taylor', 'include_activations': True})
    >>> record_options(LoopSettings(script="t.py", criterion="l1"))[0] is None
    True
    >>> record_options(LoopSettings(script="t.py", criterion="apoz"))[1]["reduction"]
    'zero_fraction'
    """
    config = dict(RECORD_CONFIG)
    reduction = SOURCE_REDUCTIONS.get(settings.criterion)
    if reduction is None or settings.full_tensors:
        return settings.include, config
    config["reduction"] = reduction
    if settings.include:
        return settings.include, config
    config["include_activations"] = True
    return TAYLOR_INCLUDE, config
