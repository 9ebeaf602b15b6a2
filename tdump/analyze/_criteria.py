"""Pluggable filter-importance criteria.

A criterion is one small class registered by name with :func:`register_criterion`.
It says, per conv layer, which stored tensors it needs (:meth:`Criterion.plan`),
how one saved record of those tensors reduces to a per-channel partial sum
(:meth:`Criterion.partial`, run in Dask workers, one call per stored chunk), and
how the summed partials become the score (:meth:`Criterion.finish`). For every
criterion a **higher score means a more important filter**. Formulas are in
``docs/ranking.md``.

Examples
--------
A new criterion (mean absolute activation) needs nothing but this:

>>> import numpy as np
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

from tdump._format import grad_name
from tdump.analyze._arith import (
    _filter_dot,
    _per_filter_sum,
    _spatial_dot_mean,
    _spatial_mean,
    _weight_normed,
)
from tdump.analyze._mapping import Dataflow
from tdump.errors import ConfigError, MissingTensorError

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
    >>> @register_criterion("taylor")
    ... class MyTaylor(Taylor):
    ...     pass
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: a criterion named 'taylor' is registered already (tdump.analyze._criteria.Taylor); pick another name, or pass register_criterion('taylor', replace=True) to replace it
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


def _filter_axis(layer: str, ctx: PlanContext) -> int:
    return 1 if ctx.dataflow.is_transposed(layer) else 0


def _need_grad(ctx: PlanContext, act: str, crit: str) -> None:
    """Raise when the dump cannot give ``act`` a gradient: none recorded in this mode.

    A dump with other outputs' gradients leaves the layer unscored instead (with a note):
    its backward never reached it (an auxiliary head the loss leaves out) or the
    selection left its gradient out, and the other layers still rank.
    """
    g = grad_name(act)
    if g in ctx.names or (ctx.mode == "train" and has_output_gradients(ctx.names)):
        return
    raise MissingTensorError(
        _no_grad_mode_hint(crit, ctx, [g, act + TAYLOR_SUFFIX])
        or f"dump has no gradients for {act!r}; record with include_regex matching it and "
        f"activation gradients, e.g. --include '.*relu'"
    )


#: How to record full activations again (no capture reduction keeps the zeros).
_RECORD_FULL = (
    "record without the reduction (tdump loop --full-tensors; tdump record without "
    "\"reduction\" in --config, whose default --include '.*relu' stores the ReLU outputs)"
)


# --------------------------------------------------------------------------- criteria
@register_criterion("taylor")
class Taylor(Criterion):
    """Molchanov et al. 2017: mean over examples of |spatial mean of activation x gradient|."""

    uses_batch = True
    signed: ClassVar[bool] = False

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        for cand in ctx.call_outputs(layer):
            g = grad_name(cand)
            if cand in ctx.names and g in ctx.names:
                for role, name in (("activation", cand), ("gradient", g)):
                    stored = ctx.reduction(name)
                    if stored is not None:
                        raise MissingTensorError(
                            f"{name!r} is stored reduced (reduction={stored!r}); {self.name} "
                            f"needs the full {role} or its Taylor term: record without the "
                            """reduction, or with --config '{"reduction": "taylor"}'"""
                        )
                return Plan({"act": cand, "grad": g})
            term = cand + TAYLOR_SUFFIX
            if term in ctx.names:  # reduce-at-source: per-example spatial mean of a*g
                return Plan({"term": term}, {"term": "taylor"})
        act = ctx.activation(layer)
        if act is not None:
            _need_grad(ctx, act, self.name)
        return None

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        if "term" in values:
            t = values["term"].astype(np.float64)
        else:
            t = _spatial_dot_mean(values["act"], values["grad"])
        if not self.signed:
            t = np.abs(t)
        return t.sum(axis=0), t.shape[0]

    def missing(self, ctx: PlanContext) -> str:
        grads = (n for n in ctx.train_names or () if n.endswith((".grad", TAYLOR_SUFFIX)))
        return _no_grad_mode_hint(self.name, ctx, (n for n in grads if ".output_" in n)) or (
            "dump has no activations of conv or hidden Linear layers (e.g. ReLU outputs) "
            f"with gradients in mode {ctx.mode!r}; record with include_regex matching them "
            "and activation gradients, e.g. --include '.*relu'"
        )


@register_criterion("taylor-signed")
class TaylorSigned(Taylor):
    """The seed's signed variant: mean of activation x gradient over batch and space."""

    signed = True


#: ``weight_norm``'s (g, v) names under a layer: the parametrization, then the old hook.
_WEIGHT_NORM_PAIRS = (
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ("weight_g", "weight_v"),
)


@register_criterion("l1")
class L1(Criterion):
    """Li et al. 2017: L1 norm of each filter's weights (last selected saved step)."""

    all_records = False

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        axis = _filter_axis(layer, ctx)
        w = f"{layer}.weight"
        if w in ctx.names:
            return Plan({"w": w}, filter_axis=axis)
        for g, v in _WEIGHT_NORM_PAIRS:  # the weight is computed from g and v
            if f"{layer}.{g}" in ctx.names and f"{layer}.{v}" in ctx.names:
                return Plan({"g": f"{layer}.{g}", "v": f"{layer}.{v}"}, filter_axis=axis)
        return None

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        w = values["w"] if "w" in values else _weight_normed(values["g"], values["v"])
        return _per_filter_sum(np.abs(np.moveaxis(w, plan.filter_axis, 0))), 1

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no conv or Linear weights in mode {ctx.mode!r}; record them with "
            "include_regex matching them, e.g. --include '.*weight'"
        )


@register_criterion("bn-gamma")
class BNGamma(Criterion):
    """Liu et al. 2017: |scale| of the BatchNorm that consumes the conv's output."""

    all_records = False

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        bn = ctx.dataflow.following_bn(layer)
        if bn is None:
            return None
        w = f"{bn}.weight"
        return Plan({"gamma": w}) if w in ctx.names else None

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        return np.abs(values["gamma"].astype(np.float64)), 1

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no BatchNorm weights following a conv or Linear in mode {ctx.mode!r}; "
            "record them with include_regex matching them, e.g. --include '.*bn.*weight'"
        )


@register_criterion("apoz")
class APoZ(Criterion):
    """Hu et al. 2016, as importance: 1 - average percentage of zeros of the ReLU output."""

    uses_batch = True

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        act = ctx.activation(layer, activation_only=True)
        if act is None:
            if any(o + TAYLOR_SUFFIX in ctx.names for o in ctx.call_outputs(layer)):
                # recorded, but only as a*g (reduction="taylor"): no zeros left to count
                raise MissingTensorError(
                    "this dump stores only taylor terms (reduction='taylor'); apoz needs full "
                    f"activations or reduction='zero_fraction': {_RECORD_FULL}"
                )
            return None
        red = ctx.reduction(act)
        # a per-example zero fraction (reduction="zero_fraction") is what APoZ averages;
        # mean/abs_mean/l2/taylor lose the zeros
        if red is not None and red not in ("zero_fraction", "apoz"):
            raise MissingTensorError(
                f"{act!r} is stored reduced (reduction={red!r}); apoz needs full activations "
                "or reduction='zero_fraction': "
                f"{_RECORD_FULL}"
            )
        return Plan({"act": act}, {"act": red} if red else {})

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        a = values["act"]
        z = a.astype(np.float64) if plan.reductions.get("act") else _spatial_mean(a == 0)
        return z.sum(axis=0), z.shape[0]

    def finish(self, total: np.ndarray, count: int) -> np.ndarray:
        return 1.0 - total / max(count, 1)

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no ReLU outputs of conv or hidden Linear layers in mode {ctx.mode!r}; "
            "record them with include_regex matching them, e.g. --include '.*relu'"
        )


@register_criterion("taylor-weight")
class TaylorWeight(Criterion):
    """Molchanov et al. 2019: (sum over a filter's weights of w x dL/dw)^2, mean over steps."""

    uses_batch = True

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        w = f"{layer}.weight"
        if w not in ctx.names:
            return None
        g = grad_name(w)
        if g not in ctx.names:
            raise MissingTensorError(
                _no_grad_mode_hint(self.name, ctx, [g], ".*weight")
                or f"dump has no gradient for {w!r}; record parameter gradients with include_regex "
                f"matching them, e.g. --include '.*weight'"
            )
        return Plan({"w": w, "grad": g}, filter_axis=_filter_axis(layer, ctx))

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        w, g = (np.moveaxis(values[k], plan.filter_axis, 0) for k in ("w", "grad"))
        s = _filter_dot(w, g)
        return s * s, 1

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no conv or Linear weights with gradients in mode {ctx.mode!r}; record "
            "them with include_regex matching them, e.g. --include '.*weight'"
        )
