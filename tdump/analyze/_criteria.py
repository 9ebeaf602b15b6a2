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
    """

    sources: Mapping[str, str]
    reductions: Mapping[str, str] = field(default_factory=dict)


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


def register_criterion(name: str) -> Callable[[_C], _C]:
    """Class decorator registering a :class:`Criterion` subclass under ``name``."""

    def deco(cls: _C) -> _C:
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
        raise ConfigError(f"--signed applies to the taylor criterion only, not {name!r}")
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
def _spatial_mean(x: np.ndarray) -> np.ndarray:
    """(batch, channel, *spatial) -> (batch, channel) float64 mean over spatial positions."""
    if x.ndim <= 2:
        return x.astype(np.float64)
    return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=-1, dtype=np.float64)


#: Products are formed per block of this many elements: a float64 block stays in L2 cache.
_BLOCK_ELEMS = 1 << 15

#: float32 x float32 products are summed in float32 over runs of at most this many
#: elements, and the runs' sums in float64.
_F32_RUN = 256


def _dot_sums(a: np.ndarray, b: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """(rows, channel, n) x2 -> (rows, channel) float64 sums over the last axis of ``a * b``.

    Straight from the stored dtype, with no full-size float64 temporary:

    * float32 x float32 (unless ``exact``): ``einsum`` in float32 over runs of
      ``_F32_RUN`` elements, the runs added in float64. The error stays below about
      ``1e-6 * sum |a * b|``, the size of the error the inputs already carry (each
      float32 value is rounded to ``6e-8``), and it is 5-8x faster than widening to
      float64 first: the activation dot products were a third of a `tdump rank`'s
      arithmetic.
    * otherwise (float16, mixed, ``exact``): a cache-sized block at a time is widened
      to float64, multiplied (exact) and summed. float16's einsum runs element by element.
    """
    rows, channels, n = a.shape
    a2 = a.reshape(rows * channels, n)
    b2 = b.reshape(rows * channels, n)
    out = np.zeros(rows * channels, dtype=np.float64)
    if n == 0 or not len(out):
        return out.reshape(rows, channels)
    if not exact and a2.dtype == b2.dtype == np.float32:
        runs, rest = divmod(n, _F32_RUN)
        if runs:  # (row, run, element) views of the same memory: no copy
            whole = (len(out), runs, _F32_RUN)
            a3, b3 = a2[:, : n - rest].reshape(whole), b2[:, : n - rest].reshape(whole)
            np.add.reduce(np.einsum("ijk,ijk->ij", a3, b3), axis=1, dtype=np.float64, out=out)
        if rest:
            out += np.einsum("ij,ij->i", a2[:, n - rest :], b2[:, n - rest :])
        return out.reshape(rows, channels)
    step = max(1, _BLOCK_ELEMS // n)
    tmp = np.empty((min(step, len(out)), n), dtype=np.float64)
    for i in range(0, len(out), step):
        j = min(i + step, len(out))
        prod = tmp[: j - i]
        np.multiply(a2[i:j], b2[i:j], out=prod, dtype=np.float64)
        np.add.reduce(prod, axis=1, out=out[i:j])
    return out.reshape(rows, channels)


def _spatial_dot_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(batch, channel, *spatial) x2 -> (batch, channel): float64 mean over space of ``a * b``.

    >>> a = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    >>> _spatial_dot_mean(a, a).tolist() == (a.astype(np.float64) ** 2).mean(axis=(2, 3)).tolist()
    True
    """
    if a.ndim <= 2:
        return np.multiply(a, b, dtype=np.float64)
    a3 = a.reshape(a.shape[0], a.shape[1], -1)
    return _dot_sums(a3, b.reshape(a3.shape)) / a3.shape[-1]


def _filter_dot(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(out_channel, ...) x2 -> (out_channel,): float64 sum over a filter's weights of ``w * g``.

    Exact: a filter's ``sum(w * g)`` cancels to a small fraction of ``sum |w * g|``, and
    weights are small next to activations.
    """
    w3 = w.reshape(1, w.shape[0], -1)
    return _dot_sums(w3, g.reshape(w3.shape), exact=True)[0]


def _per_filter_sum(x: np.ndarray) -> np.ndarray:
    """(out_channel, ...) -> (out_channel,) float64 sum over the filter's weights."""
    return x.reshape(x.shape[0], -1).sum(axis=1, dtype=np.float64)


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


def _need_grad(ctx: PlanContext, act: str, crit: str) -> str:
    g = grad_name(act)
    if g not in ctx.names:
        raise MissingTensorError(
            _no_grad_mode_hint(crit, ctx, [g, act + TAYLOR_SUFFIX])
            or f"dump has no gradients for {act!r}; record with include_regex matching it and "
            f"activation gradients, e.g. --include '.*relu'"
        )
    return g


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
            f"dump has no activations of conv layers (e.g. ReLU outputs) with gradients in mode "
            f"{ctx.mode!r}; record with include_regex matching them and activation gradients, "
            f"e.g. --include '.*relu'"
        )


@register_criterion("taylor-signed")
class TaylorSigned(Taylor):
    """The seed's signed variant: mean of activation x gradient over batch and space."""

    signed = True


@register_criterion("l1")
class L1(Criterion):
    """Li et al. 2017: L1 norm of each filter's weights (last selected saved step)."""

    all_records = False

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        w = f"{layer}.weight"
        return Plan({"w": w}) if w in ctx.names else None

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        return _per_filter_sum(np.abs(values["w"])), 1

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no conv weights in mode {ctx.mode!r}; record them with include_regex "
            f"matching them, e.g. --include '.*weight'"
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
            f"dump has no BatchNorm weights following a conv in mode {ctx.mode!r}; record them "
            f"with include_regex matching them, e.g. --include '.*bn.*weight'"
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
            f"dump has no ReLU outputs of conv layers in mode {ctx.mode!r}; record them with "
            f"include_regex matching them, e.g. --include '.*relu'"
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
        return Plan({"w": w, "grad": g})

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        s = _filter_dot(values["w"], values["grad"])
        return s * s, 1

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no conv weights with gradients in mode {ctx.mode!r}; record them with "
            f"include_regex matching them, e.g. --include '.*weight'"
        )
