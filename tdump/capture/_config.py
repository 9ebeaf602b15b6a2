"""Hook settings: :class:`HookConfig`, per-collection overrides, loading from files and env.

Everything a :class:`~tdump.capture.Hook` does is decided by one frozen
:class:`HookConfig`; it is stored verbatim (as JSON) in the dump's rank attributes,
so a dump says how it was made.

Examples
--------
>>> cfg = HookConfig(out="d.zarr", include_regex=".*relu|.*weight", save_interval=10)
>>> cfg.collection("activations").should_save(20, cfg), cfg.collection("activations").should_save(21, cfg)
(True, False)
>>> HookConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdump.capture._checks import check_collection, check_hook
from tdump.errors import ConfigError, first_line

__all__ = [
    "ALWAYS_ON",
    "AUTO_COMPRESSION",
    "COLLECTIONS",
    "DEFAULT_INCLUDE",
    "ENV_VAR",
    "REDUCTIONS",
    "WRITE_MODES",
    "CollectionConfig",
    "HookConfig",
    "load_config",
]

#: The collections, named as in docs/FORMAT.md.
COLLECTIONS: tuple[str, ...] = (
    "weights",
    "biases",
    "gradients",
    "activations",
    "activation_gradients",
    "running_stats",
    "losses",
    "loss_inputs",
    "scalars",
)
#: Collections saved whole at every save step whatever ``include_regex`` says (they are tiny).
ALWAYS_ON: frozenset[str] = frozenset({"losses", "loss_inputs", "scalars"})
#: The collections of module outputs and their gradients (``include_activations``).
ACTIVATION_COLLECTIONS: frozenset[str] = frozenset({"activations", "activation_gradients"})
#: Reduce-at-source options for activations and their gradients (see docs/capture.md).
REDUCTIONS: tuple[str, ...] = ("mean", "abs_mean", "l2", "taylor", "zero_fraction")
COMPRESSIONS: tuple[str, ...] = ("auto", "zstd", "lz4", "lz4-noshuffle", "zstd-plain", "none")
#: What ``compression="auto"`` (the default) stores each collection with; others: ``none``.
#: Measured on resnet18 (benchmarks/results/capture_overhead.txt): weights and gradients
#: compress 1.0-1.08x with any codec, so compressing them costs CPU for nothing; ReLU
#: outputs and their gradients compress 1.3x with LZ4 at several hundred MB/s per core
#: and decode at GB/s for ranking (zstd-1: 1.5x, 3-4x slower both ways). That 1.3x is
#: the collections' total: a dense tensor among them (a gradient no ReLU or max-pool
#: masked) is stored uncompressed (``tdump.capture._writer.shrinks``).
AUTO_COMPRESSION: dict[str, str] = {
    "activations": "lz4-noshuffle",
    "activation_gradients": "lz4-noshuffle",
}
STORAGE_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
#: What to do with an ``out`` that already holds a dump (``HookConfig.write_mode``).
WRITE_MODES: tuple[str, ...] = ("create", "append", "overwrite")
#: The seed's selection, the default of ``tdump record`` and ``tdump.capture.auto``:
#: ReLU outputs and their gradients, weights, biases, parameter gradients, BN stats.
DEFAULT_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"
#: Environment variable read by ``tdump.capture.auto``: a path to a JSON/YAML file, or inline JSON.
ENV_VAR = "TDUMP_CONFIG"


@dataclass(frozen=True)
class CollectionConfig:
    """Overrides for one collection. ``None`` fields inherit the hook's setting.

    Parameters
    ----------
    name
        One of :data:`COLLECTIONS`.
    enabled
        ``False`` saves nothing of this collection.
    include_regex
        Extra selection for this collection (OR-ed with the hook's ``include_regex``).
    save_all
        Save every tensor of the collection, ignoring the regexes.
    save_interval, save_steps
        This collection's own schedule.

    Examples
    --------
    >>> CollectionConfig("activations", save_interval=10).save_interval
    10
    """

    name: str
    enabled: bool = True
    include_regex: str | None = None
    save_all: bool | None = None
    save_interval: int | None = None
    save_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, value in check_collection(self).items():
            object.__setattr__(self, name, value)

    def should_save(self, step: int, hook: HookConfig, mode: str = "train") -> bool:
        """Whether this collection is saved at ``step`` of ``mode`` under ``hook``'s schedule."""
        if not self.enabled:
            return False
        if hook.start_step is not None and step < hook.start_step:
            return False
        if hook.end_step is not None and step >= hook.end_step:
            return False
        steps = self.save_steps if self.save_steps is not None else hook.save_steps
        if steps is not None and (self.save_steps is not None or self.save_interval is None):
            return step in steps
        interval = self.save_interval or hook.interval(mode)
        start = hook.start_step or 0
        return (step - start) % interval == 0


def with_default_selection(data: dict[str, Any]) -> dict[str, Any]:
    """Hook settings ``data`` with the default selection where they name none.

    No ``include_regex``: the seed's (:data:`DEFAULT_INCLUDE`) plus the outputs of
    activation modules by type (``include_activations``), what ``tdump record`` saves.

    >>> with_default_selection({})["include_activations"]
    True
    >>> with_default_selection({"include_regex": ".*weight"})
    {'include_regex': '.*weight'}
    """
    if "include_regex" not in data:
        data["include_regex"] = DEFAULT_INCLUDE
        data.setdefault("include_activations", True)
    return data


def default_writer_threads(cpus: int | None = None) -> int:
    """Writer threads for ``writer_threads=0``: a quarter of the CPUs, between 1 and 4.

    Training needs the CPUs of a small machine (CPU training uses all of them); a larger
    one, such as a GPU machine, has CPUs to spare for encoding a record's tensors.

    >>> default_writer_threads(2), default_writer_threads(16), default_writer_threads(64)
    (1, 4, 4)
    """
    if cpus is None:
        cpus = usable_cpus()
    return max(1, min(4, cpus // 4))


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota.

    A container limited to 2 CPUs on a 64-CPU host sees all 64 in its affinity; the
    quota (``cpu.max``: ``"<quota> <period>"``, or ``"max ..."`` for none) says 2.

    >>> 1 <= usable_cpus() <= (os.cpu_count() or 1)
    True
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = n or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))  # a part-CPU quota counts as one
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: the affinity stands
    return n


@dataclass(frozen=True)
class HookConfig:
    """All settings of a :class:`~tdump.capture.Hook`.

    Parameters
    ----------
    out
        Store path or fsspec URL (``dump.zarr``).
    write_mode
        What to do when ``out`` already holds records of this rank: ``"create"``
        (default) refuses with a one-line error, ``"append"`` continues the dump (same
        model; step numbers go on from the last run's), ``"overwrite"`` replaces it.
    include_regex
        ``re.search``-ed against tensor names (docs/FORMAT.md). ``None`` saves only the
        always-on collections (losses, loss inputs, scalars) and collections with
        ``save_all``.
    exclude_regex
        Names matching this are never saved.
    include_activations
        Also save the outputs of activation modules (ReLU, ReLU6, GELU, SiLU, ...: by
        type, whatever their names, e.g. ``features.1.output_0`` in an
        ``nn.Sequential``) and their gradients, so ranking finds them in any CNN. A
        model with convs but no activation module (``F.relu`` everywhere) gets its conv
        and norm (BatchNorm, GroupNorm, ...) outputs instead, which ranking scores as pre-activations.
        ``tdump record``, ``tdump loop`` and :mod:`tdump.capture.auto` set it when no
        ``--include`` (``include_regex``) is given.
    save_interval
        Save every N-th step of each mode (steps counted from 0, so step 0 is saved).
    save_steps
        Explicit steps to save (integers >= 0) instead of the interval.
    start_step, end_step
        Save only steps in ``[start_step, end_step)``.
    collections
        Per-collection overrides (:class:`CollectionConfig`).
    compression
        ``"auto"`` (default: per collection, :data:`AUTO_COMPRESSION`: activations
        and their gradients Blosc LZ4 without shuffle, everything else uncompressed),
        or one codec for every tensor: ``"zstd"`` (Blosc zstd level 1 + byte
        shuffle), ``"lz4"`` (Blosc LZ4 + byte shuffle), ``"lz4-noshuffle"``,
        ``"zstd-plain"`` (zstd codec), ``"none"``; ``"zstd:3"`` sets a level.
    storage_dtype
        ``None`` keeps the training dtype; ``"float16"`` or ``"bfloat16"`` (float32
        rounded to bfloat16 precision, whose zeroed low bytes the compressor drops).
    reduction
        Reduce activations and their gradients at the source (one of :data:`REDUCTIONS`).
    strict
        Re-raise errors inside the hook instead of logging once and switching off.
    mode
        Fixed mode (``train``/``eval``/``predict``); ``None`` follows ``model.training``.
    mode_save_interval
        Per-mode intervals overriding ``save_interval`` (e.g. ``{"eval": 1}``).
    step_source
        ``"forward"``: a step is one forward of the root module per mode;
        ``"optimizer"``: the train step is the number of optimizer steps so far.
    queue_size
        Saved steps that may wait for the background writer before training blocks.
    writer_threads
        Threads that encode and write the tensors of a record on a local disk; ``0``
        (default) picks :func:`~tdump.capture.default_writer_threads` (one on a machine
        of four CPUs or fewer, where training needs them all).
    rank, world_size
        Override the DDP rank (default: torch.distributed, else env ``RANK``).

    Examples
    --------
    >>> HookConfig(include_regex=".*relu|.*weight|.*bias|.*running_mean|.*running_var",
    ...            save_interval=100).save_interval
    100
    """

    out: str = "tdump.zarr"
    write_mode: str = "create"
    include_regex: str | None = None
    exclude_regex: str | None = None
    include_activations: bool = False
    save_interval: int = 100
    save_steps: tuple[int, ...] | None = None
    start_step: int | None = None
    end_step: int | None = None
    collections: tuple[CollectionConfig, ...] = ()
    compression: str = "auto"
    storage_dtype: str | None = None
    reduction: str | None = None
    strict: bool = False
    mode: str | None = None
    mode_save_interval: dict[str, int] | None = None
    step_source: str = "forward"
    queue_size: int = 2
    writer_threads: int = 0
    rank: int | None = None
    world_size: int | None = None
    _by_name: dict[str, CollectionConfig] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name, value in check_hook(self).items():  # every field, one-line errors
            object.__setattr__(self, name, value)
        colls = tuple(_collections_arg(self.collections))
        names = [c.name for c in colls]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                f"collections name {', '.join(twice)} more than once; give each collection once"
            )
        object.__setattr__(self, "collections", colls)
        by_name = {c: CollectionConfig(c) for c in COLLECTIONS}
        by_name.update({c.name: c for c in colls})
        self._by_name.update(by_name)

    def collection(self, name: str) -> CollectionConfig:
        """The effective :class:`CollectionConfig` of collection ``name``."""
        return self._by_name[name]

    def interval(self, mode: str) -> int:
        """The save interval of ``mode`` (``mode_save_interval`` or ``save_interval``)."""
        return (self.mode_save_interval or {}).get(mode, self.save_interval)

    def saved_collections(self, step: int, mode: str = "train") -> frozenset[str]:
        """Collections to save at ``step`` of ``mode`` (empty: the step is not saved)."""
        return frozenset(c for c, cc in self._by_name.items() if cc.should_save(step, self, mode))

    def selects(self, name: str, collection: str, *, of_activation: bool = False) -> bool:
        """Whether tensor ``name`` of ``collection`` is selected (ignoring the schedule).

        ``of_activation``: ``name`` is an output (or its gradient) of an activation
        module, which :attr:`include_activations` selects.
        """
        cc = self._by_name[collection]
        if not cc.enabled:
            return False
        if self.exclude_regex and re.search(self.exclude_regex, name):
            return False
        if cc.save_all or (cc.save_all is None and collection in ALWAYS_ON):
            return True
        if of_activation and self.include_activations and collection in ACTIVATION_COLLECTIONS:
            return True
        for rx in (self.include_regex, cc.include_regex):
            if rx is not None and re.search(rx, name):
                return True
        return False

    def replace(self, **changes: Any) -> HookConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what the store's ``config`` attribute holds)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name == "collections":
                value = [
                    {k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c in value
                ]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HookConfig:
        """Build from a dict such as :meth:`to_dict` returns; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown hook setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kwargs = dict(data)
        if "collections" in kwargs:
            kwargs["collections"] = tuple(_collections_arg(kwargs["collections"]))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"invalid hook settings: {exc}") from None


def _as_collection(value: Any) -> CollectionConfig:
    if isinstance(value, CollectionConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(
            "a collection override must be a mapping of settings such as "
            f'{{"name": "losses", "save_interval": 1}}, not {value!r}'
        )
    known = [f.name for f in dataclasses.fields(CollectionConfig)]
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} in collection override {dict(value)!r}; "
            f"known: {', '.join(known)}"
        )
    if "name" not in value:
        raise ConfigError(
            f"collection override {dict(value)!r} has no name; add one of {', '.join(COLLECTIONS)}"
        )
    return CollectionConfig(**value)


def _collections_arg(value: Any) -> Iterable[CollectionConfig]:
    """Accept ``[{"name": ...}, ...]``, ``{"activations": {...}}`` or CollectionConfigs."""
    if isinstance(value, Mapping):
        out = []
        for name, settings in value.items():
            if settings is not None and not isinstance(settings, Mapping):
                raise ConfigError(
                    f"collections: the settings of {name!r} must be a mapping such as "
                    f'{{"save_interval": 1}}, not {settings!r}'
                )
            out.append(_as_collection({"name": name, **dict(settings or {})}))
        return out
    if isinstance(value, (list, tuple)):
        return [_as_collection(v) for v in value]
    raise ConfigError(
        f"collections must be a list of collection overrides or a mapping of them, not {value!r}"
    )


def _kind(data: Any) -> str:
    """What a parsed config that is not a mapping holds, in words."""
    if data is None:
        return "nothing"
    if isinstance(data, list):
        return "a list"
    if isinstance(data, str):
        return "a string"
    if isinstance(data, bool):
        return "a boolean"
    return "a number" if isinstance(data, (int, float)) else type(data).__name__


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a long inline text is no file name (ENAMETOOLONG)
        return False


def load_config(source: str | os.PathLike[str]) -> dict[str, Any]:
    """Read hook settings from a JSON/YAML file path, or from inline JSON text.

    Returns the raw dict (keys as in :class:`HookConfig`); validate with
    :meth:`HookConfig.from_dict`.

    Examples
    --------
    >>> load_config('{"save_interval": 5}')
    {'save_interval': 5}
    >>> load_config('[1, 2]')
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: hook config '[1, 2]' is JSON, but a list, not an object of settings; pass e.g. '{"save_interval": 10}'
    """
    text = str(source).strip()
    example = "pass e.g. '{\"save_interval\": 10}'"
    path = Path(text)
    if text.startswith("{") or not _is_file(path):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.startswith("{"):
                raise ConfigError(f"inline hook config is not valid JSON: {exc}") from None
            raise ConfigError(
                f"config file {text} not found; pass a JSON or YAML file, or inline JSON "
                f"({example[5:]})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"hook config {text[:60]!r} is JSON, but {_kind(data)}, not an object of "
                f"settings; {example}"
            )
        return data
    raw = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except Exception as exc:
        raise ConfigError(f"cannot parse config file {text}: {first_line(exc, None)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {text} holds {_kind(data)}, not a mapping of settings "
            "(save_interval: 10, ...)"
        )
    return data
