"""Pluggable filter-importance criteria.

A criterion is one small class registered by name with :func:`register_criterion`.
It says, per conv layer, which stored tensors it needs (:meth:`Criterion.plan`),
how one saved record of those tensors reduces to a per-channel partial sum
(:meth:`Criterion.partial`, run in Dask workers, one call per stored chunk), and
how the summed partials become the score (:meth:`Criterion.finish`). For every
criterion a **higher score means a more important filter**. Formulas are in
``docs/ranking.md``; the built-in criteria are in ``_builtin_criteria.py``, which
``tdump.analyze`` imports (so they are registered before any lookup).

Examples
--------
A new criterion (mean absolute activation) needs nothing but this:

>>> import numpy as np
>>> from tdump.analyze._arith import _spatial_mean
>>> @register_criterion("mean-abs-act")
... class MeanAbsActivation(Criterion):
...     "Mean |activation| per channel."
...     uses_batch = True
...     def plan(self, layer, ctx):
...         act = ctx.activation(layer)
...         return None if act is None else Plan({"act": act})
...     def partial(self, values, plan):
...         a = values["act"]
...         return _spatial_mean(np.abs(a)).sum(axis=0), a.shape[0]
>>> "mean-abs-act" in criteria()
True
>>> _ = _REGISTRY.pop("mean-abs-act")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from tdump._dataflow import Dataflow
from tdump.errors import ConfigError

__all__ = [
    "Criterion",
    "Plan",
    "PlanContext",
    "criteria",
    "get_criterion",
    "register_criterion",
]

_REGISTRY: dict[str, type[Criterion]] = {}
#: Suffix of the capture stage's reduce-at-source Taylor term (``Hook(reduction="taylor")``):
#: ``<module>.output_<k>.taylor``, dims (batch, channel), the spatial mean of activation x gradient.
TAYLOR_SUFFIX = ".taylor"
#: Entry-point group through which installed packages publish criteria (for the CLI).
ENTRY_POINT_GROUP = "tdump.criteria"
_C = TypeVar("_C", bound="type[Criterion]")


@dataclass(frozen=True)
class Plan:
    """What a criterion reads for one layer.

    Attributes
    ----------
    sources
        ``{role: tensor name}``, e.g. ``{"act": "layer1.0.relu.output_0", "grad": "...grad"}``.
    reductions
        ``{role: reduction}`` for tensors the capture stage stored already reduced
        (their ``reduction`` attribute); absent roles are full tensors.
    filter_axis
        The axis of a weight that indexes the layer's output channels: 0, or 1 for a
        transposed conv (weight ``(in, out, *kernel)``).
    """

    sources: Mapping[str, str]
    reductions: Mapping[str, str] = field(default_factory=dict)
    filter_axis: int = 0


@dataclass
class PlanContext:
    """What a criterion may look at while planning: the dataflow and the dump's tensors."""

    dataflow: Dataflow
    names: frozenset[str]
    mode: str
    attrs: Callable[[str], Mapping[str, Any]]
    #: Lists the tensor names of the dump's ``train`` mode when planning another mode
    #: (``None``: unknown); read through :attr:`train_names`, only when a hint needs it.
    list_train: Callable[[], frozenset[str] | None] | None = None
    _train: frozenset[str] | None = field(default=None, repr=False)
    _acts: dict[str, list[str]] | None = field(default=None, repr=False)
    _calls: dict[str, list[str]] | None = field(default=None, repr=False)

    @property
    def train_names(self) -> frozenset[str] | None:
        """The ``train`` mode's tensor names (listed on first use), or ``None`` if unknown.

        A hint for a mode without gradients then tells "eval steps have no gradients,
        rank train" from "not recorded at all".
        """
        if self._train is None and self.list_train is not None:
            self._train = self.list_train()
        return self._train

    def activations(self, layer: str) -> list[str]:
        """Stored module outputs carrying ``layer``'s channels, best first (ReLU after bn)."""
        if self._acts is None:
            outs = [n for n in self.names if n.rsplit(".", 1)[-1].startswith("output_")]
            self._acts = self.dataflow.outputs_by_conv(sorted(outs))
        return self._acts.get(layer, [])

    def call_outputs(self, layer: str) -> list[str]:
        """Every recorded module-call output carrying ``layer``'s channels, stored or not, best first."""
        if self._calls is None:
            self._calls = self.dataflow.outputs_by_conv(
                [str(c["name"]) for c in self.dataflow.calls]
            )
        return self._calls.get(layer, [])

    def activation(self, layer: str, *, activation_only: bool = False) -> str | None:
        """The preferred stored output for ``layer`` (``None`` if none is stored)."""
        for name in self.activations(layer):
            if not activation_only or self.dataflow.is_activation_output(name):
                return name
        return None

    def reduction(self, name: str) -> str | None:
        """The stored ``reduction`` attribute of tensor ``name`` (``None`` for full tensors)."""
        red = self.attrs(name).get("reduction")
        return str(red) if red else None


class Criterion:
    """Base class of a criterion. Subclass, set the class attributes, register.

    Attributes
    ----------
    name
        Registered name (set by :func:`register_criterion`).
    uses_batch
        The score is built from per-example data; the ``examples`` column counts them.
    all_records
        Reduce over every selected record (``True``) or use only the last selected
        record that holds the tensors (``False``: criteria on the final weights).
    """

    name: ClassVar[str] = ""
    uses_batch: ClassVar[bool] = False
    all_records: ClassVar[bool] = True

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        """Tensors to read for ``layer``; ``None`` to skip the layer (nothing stored for it)."""
        raise NotImplementedError

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        """Reduce one record: ``values`` maps roles to arrays (batch rows already trimmed).

        Returns a per-channel float64 sum and the count it sums over.
        """
        raise NotImplementedError

    def finish(self, total: np.ndarray, count: int) -> np.ndarray:
        """Turn the summed partials into the score (default: the mean)."""
        return total / max(count, 1)

    def missing(self, ctx: PlanContext) -> str:
        """One-line message when no layer could be planned: what to capture instead."""
        return f"dump has no tensors criterion {self.name!r} can use in mode {ctx.mode!r}"


def register_criterion(name: str, *, replace: bool = False) -> Callable[[_C], _C]:
    """Class decorator registering a :class:`Criterion` subclass under ``name``.

    Parameters
    ----------
    name
        The name ``rank(criterion=...)`` and ``tdump rank -c`` take: a non-empty string.
    replace
        Replace a criterion already registered under ``name`` (a built-in such as
        ``taylor``, or a plug-in). Without it, registering a taken name raises, so that
        a plug-in cannot silently change what a built-in name computes.

    Raises
    ------
    ConfigError
        ``name`` is not a non-empty string, the decorated object is not a
        :class:`Criterion` subclass (e.g. a plain function), or ``name`` is taken and
        ``replace`` is not set.

    Examples
    --------
    >>> from tdump.analyze._builtin_criteria import Taylor
    >>> @register_criterion("taylor")
    ... class MyTaylor(Taylor):
    ...     pass
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: a criterion named 'taylor' is registered already (tdump.analyze._builtin_criteria.Taylor); pick another name, or pass register_criterion('taylor', replace=True) to replace it
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"register_criterion needs a criterion name (a non-empty str), got {name!r}; "
            "use it as @register_criterion('my-name')"
        )

    def deco(cls: _C) -> _C:
        if not (isinstance(cls, type) and issubclass(cls, Criterion)):
            raise ConfigError(
                f"@register_criterion({name!r}) decorates {type(cls).__name__} "
                f"{getattr(cls, '__name__', cls)!r}, not a Criterion subclass; write "
                "class MyCriterion(tdump.analyze.Criterion) with plan() and partial()"
            )
        old = _REGISTRY.get(name)
        # a module imported twice (a plug-in, a notebook cell run again) re-registers its
        # own class (same module and name): that is no conflict
        same = old is not None and (old.__module__, old.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if old is not None and not same and not replace:
            raise ConfigError(
                f"a criterion named {name!r} is registered already "
                f"({old.__module__}.{old.__qualname__}); pick another name, or pass "
                f"register_criterion({name!r}, replace=True) to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def criteria() -> list[str]:
    """Registered criterion names.

    >>> criteria()[:3]
    ['taylor', 'taylor-signed', 'l1']
    """
    return list(_REGISTRY)


def get_criterion(name: str, *, signed: bool = False) -> Criterion:
    """Instantiate criterion ``name``; ``signed=True`` turns ``taylor`` into ``taylor-signed``."""
    if signed and name == "taylor":
        name = "taylor-signed"
    elif signed and not name.endswith("-signed"):
        raise ConfigError(f"signed / --signed applies to the taylor criterion only, not {name!r}")
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(
            f"unknown criterion {name!r}; choose one of {', '.join(criteria())}, or install "
            f"a plug-in that registers it under the entry-point group {ENTRY_POINT_GROUP!r} "
            "(docs/ranking.md)"
        ) from None


def _load_plugins() -> None:
    """Import criteria published by installed packages (entry-point group ``tdump.criteria``)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()  # the module registers its classes with @register_criterion
        except Exception as exc:  # a broken plug-in must not break the built-ins
            import warnings

            warnings.warn(
                f"tdump criterion plug-in {ep.name!r} failed to load: {exc}", stacklevel=2
            )


# --------------------------------------------------------------------------- helpers
def _no_grad_mode_hint(
    crit: str, ctx: PlanContext, wanted: Iterable[str], include: str = ".*relu"
) -> str | None:
    """The message for gradients missing because ``ctx.mode`` never has them, else ``None``.

    ``wanted``: names that would do in ``train``; if its train steps hold one, ranking
    them is the remedy, not recording again.
    """
    if ctx.mode not in ("eval", "predict"):  # the modes without a backward pass
        return None
    todo = "rank --mode train"
    if frozenset(wanted).isdisjoint(ctx.train_names or ()):
        todo = f"record them in train steps (e.g. --include '{include}') and {todo}"
    return (
        f"{crit} needs gradients, which {ctx.mode} steps never have: {todo}, "
        f"or use -c l1 / apoz / bn-gamma for {ctx.mode}"
    )


def is_output_gradient(name: str) -> bool:
    """Whether tensor ``name`` is a module output's gradient or its Taylor term."""
    return (name.endswith(".grad") and ".output_" in name) or name.endswith(TAYLOR_SUFFIX)


def has_output_gradients(names: Iterable[str]) -> bool:
    """Whether ``names`` hold a module output's gradient (or its Taylor term) at all."""
    return any(is_output_gradient(n) for n in names)
