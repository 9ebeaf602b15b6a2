"""The built-in criteria: taylor, taylor-signed, l1, bn-gamma, apoz, taylor-weight.

Each is a :class:`~tdump.analyze._criteria.Criterion` registered by name when this
module is imported (``tdump.analyze`` does so); the formulas are in ``docs/ranking.md``.

Examples
--------
>>> from tdump.analyze import criteria
>>> criteria()[:3]
['taylor', 'taylor-signed', 'l1']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from tdump._format import grad_name
from tdump._modtypes import WEIGHT_NORM_PARAMS
from tdump.analyze._arith import (
    _filter_dot,
    _per_filter_sum,
    _spatial_dot_mean,
    _spatial_mean,
    _weight_normed,
    _weight_normed_taylor,
)
from tdump.analyze._criteria import (
    TAYLOR_SUFFIX,
    Criterion,
    Plan,
    PlanContext,
    _no_grad_mode_hint,
    has_output_gradients,
    register_criterion,
)
from tdump.errors import MissingTensorError

__all__ = ["L1", "APoZ", "BNGamma", "Taylor", "TaylorSigned", "TaylorWeight"]


def _filter_axis(layer: str, ctx: PlanContext) -> int:
    return ctx.dataflow.filter_axis(layer)


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


@register_criterion("l1")
class L1(Criterion):
    """Li et al. 2017: L1 norm of each filter's weights (last selected saved step)."""

    all_records = False

    def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
        axis = _filter_axis(layer, ctx)
        w = f"{layer}.weight"
        if w in ctx.names:
            return Plan({"w": w}, filter_axis=axis)
        for g, v in WEIGHT_NORM_PARAMS:  # the weight is computed from g and v
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
        if w in ctx.names:
            sources = {"w": w}
        else:  # weight_norm: w * dL/dw from g, v and their gradients
            pairs = [(f"{layer}.{g}", f"{layer}.{v}") for g, v in WEIGHT_NORM_PARAMS]
            found = [(g, v) for g, v in pairs if g in ctx.names and v in ctx.names]
            if not found:
                return None
            sources = {"g": found[0][0], "v": found[0][1]}
        grads = {f"{role}_grad": grad_name(name) for role, name in sources.items()}
        missing = [g for g in grads.values() if g not in ctx.names]
        if missing:
            named = " and ".join(repr(n) for n in sources.values())
            raise MissingTensorError(
                _no_grad_mode_hint(self.name, ctx, missing, ".*weight")
                or f"dump has no gradient for {named}; record parameter gradients with "
                "include_regex matching them, e.g. --include '.*weight'"
            )
        return Plan({**sources, **grads}, filter_axis=_filter_axis(layer, ctx))

    def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
        if "w" in values:
            w, g = (np.moveaxis(values[k], plan.filter_axis, 0) for k in ("w", "w_grad"))
            s = _filter_dot(w, g)
        else:
            wg = _weight_normed_taylor(values["g"], values["v"], values["g_grad"], values["v_grad"])
            s = _per_filter_sum(np.moveaxis(wg, plan.filter_axis, 0))
        return s * s, 1

    def missing(self, ctx: PlanContext) -> str:
        return (
            f"dump has no conv or Linear weights with gradients in mode {ctx.mode!r}; record "
            "them with include_regex matching them, e.g. --include '.*weight'"
        )
