"""The loop's settings (stored in ``experiment.json``) and the stop-check registry.

Examples
--------
>>> s = LoopSettings(script="train.py", rounds=3, count=8)
>>> s.to_dict()["rounds"], LoopSettings.from_dict(s.to_dict()) == s
(3, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tdump.errors import ConfigError, SelectionError

__all__ = [
    "RECORD_CONFIG",
    "RESUME_REPLACEABLE",
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
    #: ``None``: :meth:`save_interval`'s default, stored as that number
    interval: int | None = None
    full_tensors: bool = False
    config: dict[str, Any] | None = None
    input_shape: list[int] | None = None
    scheduler: str = "threads"
    workers: int | None = None
    mlflow: bool = False
    #: ``script`` names a module of a package, run as ``python -m`` runs it (``-m``)
    module: bool = False

    def __post_init__(self) -> None:
        # experiment.json keeps the number the rounds record with, not "the default"
        self.interval = self.save_interval()

    def check(self) -> None:
        """One-line :class:`ConfigError` for settings that cannot work (before any stage runs)."""
        from tdump.loop._expr import parse_stop

        if self.module:
            from tdump.capture._script import check_module

            check_module(self.script)
        elif not os.path.isfile(self.script):
            raise ConfigError(f"no training script at {self.script}; check the path")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.rounds > 1 and (self.count is None) == (self.ratio is None):
            raise ConfigError("give exactly one of --count and --ratio (what each round prunes)")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"--count must be a positive number of channels, got {self.count}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"--ratio must be between 0 and 1, got {self.ratio}")
        if self.interval is not None and self.interval < 1:
            raise ConfigError(f"--interval must be a positive number of steps, got {self.interval}")
        if self.init is not None and not os.path.isfile(self.init):
            raise ConfigError(f"no checkpoint at --init {self.init}; check the path")
        if self.stop_when:
            parse_stop(self.stop_when)
        for name in self.stop_checks:
            if name not in STOP_CHECKS:
                known = ", ".join(sorted(STOP_CHECKS)) or "none registered"
                raise ConfigError(f"unknown stop check {name!r}; known: {known}")
        check_input_shape_form(self.input_shape)
        # what the stages would refuse, refused now: after round 0 has trained, a stored
        # setting can no longer be changed (each is checked by the stage's own code)
        check_record(self)
        check_rank(self.criterion, self.scheduler, self.workers)
        check_prune(self)

    def folder(self) -> str:
        """The folder the stages import from (``--arch mynets.Net``): the script's, or
        for a module (``-m``) the current one, where ``python -m`` finds it."""
        from tdump.capture._script import import_folder

        return import_folder(self.script, module=self.module)

    def target(self) -> list[str]:
        """The script as ``tdump record`` and ``tdump loop`` take it.

        >>> LoopSettings(script="pkg.train", module=True).target()
        ['-m', 'pkg.train']
        """
        return ["-m", self.script] if self.module else [self.script]

    def reduces_at_source(self) -> bool:
        """Whether the train stage records only the criterion's per-channel reduction."""
        return self.criterion in SOURCE_REDUCTIONS and not self.full_tensors

    def save_interval(self) -> int:
        """The train stage's ``--interval``: as given, else 10 when the loop records the
        criterion's reduction at the source (a saved step then costs a few KB per layer
        and a few percent of a step's time, ``benchmarks/results/capture_overhead_loop.txt``),
        else 100 (full tensors: ~100 MB per saved step for resnet18).

        Examples
        --------
        >>> LoopSettings(script="t.py").save_interval(), LoopSettings(script="t.py", full_tensors=True).save_interval()
        (10, 100)
        >>> LoopSettings(script="t.py", criterion="l1").save_interval(), LoopSettings(script="t.py", interval=5).save_interval()
        (100, 5)
        """
        if self.interval is not None:
            return self.interval
        return 10 if self.reduces_at_source() else 100

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


#: Settings a ``--resume`` may replace, never what a completed stage produced: whether
#: the loop goes on, where ranking runs, and the TRAIN_ARGS of the trainings still to
#: run (a script that failed on its arguments, or did not start from ``{init}``, goes
#: on with new ones); the others are fixed when the experiment starts.
RESUME_REPLACEABLE = ("stop_when", "scheduler", "workers", "train_args")


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

#: Hook settings the loop's own options set: refused in ``--config`` (which option to use).
_LOOP_KEYS = {
    "out": "the loop names each round's dump",
    "write_mode": "the loop names each round's dump",
    "include_regex": "use --include",
    "save_interval": "use --interval",
}
#: Why the loop sets the other keys it sets (a different value in ``--config`` is refused).
_WHY = {
    "reduction": "what --criterion ranks from; --full-tensors records full tensors instead",
    "include_activations": "set when --include is not given; give --include to choose "
    "what is recorded",
    "collections": "the loop saves losses and loss inputs at every step for the round's metrics",
}


def record_options(settings: LoopSettings) -> tuple[str | None, dict[str, Any]]:
    """The ``--include`` (``None``: record's default) and ``--config`` of the train stage.

    Losses and loss inputs at every step (for the metrics). With a Taylor criterion
    or ``apoz``, only what ranking reads: the per-example Taylor term (or fraction of
    zeros) of the ReLU outputs (or of what ``settings.include`` selects) instead of
    full activations, their gradients and the parameters. ``settings.full_tensors``
    records ``tdump record``'s usual full tensors instead, for stop checks or analyses
    that read them. ``settings.config`` (the loop's ``--config``) is merged in; a key
    that contradicts what the loop sets is a :class:`ConfigError`.

    Examples
    --------
    >>> record_options(LoopSettings(script="t.py"))
    ('.*relu', {'collections': [...], 'reduction': 'taylor', 'include_activations': True})
    >>> record_options(LoopSettings(script="t.py", criterion="l1"))[0] is None
    True
    >>> record_options(LoopSettings(script="t.py", criterion="apoz"))[1]["reduction"]
    'zero_fraction'
    >>> s = LoopSettings(script="t.py", include="bn1", config={"include_activations": True})
    >>> record_options(s)
    ('bn1', {'collections': [...], 'reduction': 'taylor', 'include_activations': True})
    """
    config: dict[str, Any] = {"collections": [dict(c) for c in RECORD_CONFIG["collections"]]}
    include = settings.include
    if settings.reduces_at_source():
        config["reduction"] = SOURCE_REDUCTIONS[settings.criterion]
        if not include:
            config["include_activations"] = True
            include = TAYLOR_INCLUDE
    return include, merge_record_config(config, settings.config)


def merge_record_config(own: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """The loop's hook settings ``own`` with the user's ``--config`` ``given`` added.

    A key the loop sets from its own options, or sets to another value, is refused
    with a one-line :class:`ConfigError` saying which option to use (nothing is
    silently overridden either way); ``collections`` are merged by name.

    Examples
    --------
    >>> merge_record_config({"reduction": "taylor"}, {"storage_dtype": "float16"})
    {'reduction': 'taylor', 'storage_dtype': 'float16'}
    >>> merge_record_config({"reduction": "taylor"}, {"save_interval": 5})
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: --config sets save_interval, which tdump loop sets itself (use --interval); drop it from --config
    """
    merged = dict(own)
    for key, value in (given or {}).items():
        if key in _LOOP_KEYS:
            raise ConfigError(
                f"--config sets {key}, which tdump loop sets itself ({_LOOP_KEYS[key]}); "
                "drop it from --config"
            )
        if key == "collections" and key in own:
            merged[key] = _merge_collections(own[key], value)
        elif key in own and own[key] != value:
            raise ConfigError(
                f"--config sets {key} to {json.dumps(value)}, but tdump loop sets it to "
                f"{json.dumps(own[key])} ({_WHY.get(key, 'the loop needs it')}); "
                "drop it from --config"
            )
        else:
            merged[key] = value
    return merged


def _merge_collections(own: list[dict[str, Any]], given: Any) -> list[Any]:
    """The loop's collection settings plus the user's (a list, or a mapping by name as
    ``tdump record --config`` takes); one for a collection the loop sets must agree."""
    if isinstance(given, Mapping):
        given = [{"name": k, **dict(v or {})} for k, v in given.items()]
    if not isinstance(given, list):
        raise ConfigError(
            f"--config collections must be a list or a mapping, not {type(given).__name__}"
        )
    mine = {c["name"]: c for c in own}
    merged: list[Any] = list(own)
    for entry in given:
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if name in mine:
            if dict(entry) != mine[name]:
                raise ConfigError(
                    f"--config sets collection {name} to {json.dumps(entry)}, but tdump loop "
                    f"sets it to {json.dumps(mine[name])} ({_WHY['collections']}); drop it "
                    "from --config"
                )
            continue
        merged.append(entry)  # anything malformed: HookConfig says what is wrong
    return merged


def check_record(settings: LoopSettings) -> None:
    """Refuse the train stage's hook settings as ``tdump record`` would, before it runs.

    Builds the :class:`~tdump.capture.HookConfig` the stage's ``--include``,
    ``--interval`` and ``--config`` make (bad regexes, unknown keys, bad values).
    """
    from tdump.capture._config import HookConfig, with_default_selection

    include, config = record_options(settings)
    data = dict(config)
    if include is not None:
        data["include_regex"] = include
    with_default_selection(data)
    data["save_interval"] = settings.save_interval()
    try:
        HookConfig.from_dict(data)
    except SelectionError as exc:  # a bad regex: a bad setting, like every other here
        raise ConfigError(str(exc)) from None


def check_rank(criterion: str, scheduler: str, workers: int | None) -> None:
    """Refuse what ``tdump rank`` would: an unknown criterion (plug-ins included), an
    unknown scheduler, ``workers < 1``. A ``tcp://`` address is not contacted here: its
    scheduler may be started while round 0 trains (``--resume --scheduler`` replaces it).
    """
    from tdump.analyze._criteria import get_criterion
    from tdump.analyze._schedule import check_address, check_options

    get_criterion(criterion)
    check_options(scheduler, workers, None)
    scheme = scheduler.partition("://")[0] if "://" in scheduler else None
    if scheme is not None and scheme != "tcp":  # its scheme (and TLS settings): no network
        check_address(scheduler)


def check_prune(settings: LoopSettings) -> None:
    """Refuse ``--scope``, ``--min-channels``, ``--max-ratio`` as ``tdump prune`` would."""
    from tdump.surgery._plan import Settings

    count = settings.count if settings.count is not None else (0 if not settings.ratio else None)
    Settings(
        count=count,
        ratio=settings.ratio if count is None else None,
        scope=settings.scope,
        min_channels=settings.min_channels,
        max_ratio=settings.max_ratio,
    ).check()


def check_input_shape_form(shape: list[int] | None) -> None:
    """``--input-shape``: one example's shape, ``C,H,W`` (or ``C,L``, ``C,D,H,W``), sizes >= 1.

    >>> check_input_shape_form([1, 0, 8])
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: --input-shape must be C,H,W (channels, then 1 to 3 spatial sizes, batch excluded), each at least 1, e.g. 3,32,32; got 1,0,8
    """
    if shape is None:
        return
    if not 2 <= len(shape) <= 4 or any(not isinstance(v, int) or v < 1 for v in shape):
        raise ConfigError(
            "--input-shape must be C,H,W (channels, then 1 to 3 spatial sizes, batch "
            f"excluded), each at least 1, e.g. 3,32,32; got {','.join(map(str, shape))}"
        )
