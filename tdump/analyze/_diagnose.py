"""Why a conv layer got no score, and what to record so that it would.

A criterion's :meth:`~tdump.analyze.Criterion.plan` returns ``None`` for a layer whose
tensors the dump lacks. This module explains such layers in one line each and finds a
hint that is **true by construction**: a candidate set of tensors (the layer's
recorded call outputs with their gradients, its weights, its BatchNorm's weights) is
added to the dump's names and the criterion is asked to plan again; only a set it
accepts is suggested, as an ``--include`` regex that matches those tensor names.

Examples
--------
>>> calls = [
...     {"name": "conv.output_0", "module": "conv", "call": 0, "inputs": ["<input>"]},
...     {"name": "bn.output_0", "module": "bn", "call": 0, "inputs": ["conv.output_0"]},
... ]   # F.relu after bn: no activation module in the dataflow
>>> modules = {"conv": {"type": "torch.nn.Conv2d"}, "bn": {"type": "torch.nn.BatchNorm2d"}}
>>> from tdump.analyze._criteria import PlanContext, get_criterion
>>> from tdump._dataflow import Dataflow
>>> ctx = PlanContext(Dataflow(modules, calls), frozenset(), "train", lambda name: {})
>>> why, want = unscored_reason(get_criterion("taylor"), ctx, "conv")
>>> why
'no activation module receives these channels alone (F.relu, or an addition such as act(y + x), is not a module)'
>>> want
['bn.output_0', 'bn.output_0.grad']
>>> include_regex(want)
'(?:^|\\\\.)bn\\\\.output_0'
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tdump._dataflow import Dataflow
from tdump._format import grad_name
from tdump.analyze._criteria import TAYLOR_SUFFIX, Criterion, PlanContext, is_output_gradient
from tdump.analyze._tasks import NonFinite
from tdump.errors import (
    MissingTensorError,
    NonFiniteWarning,
    listed,
    needs_no_score,
    pruned_with_clause,
)

__all__ = [
    "bn_scale_note",
    "include_regex",
    "one_step_note",
    "skipped_notes",
    "unscored_reason",
    "warn_non_finite",
]

_NO_ACTIVATION_HEAD = "no activation module receives these channels alone"
_NO_ACTIVATION = (
    f"{_NO_ACTIVATION_HEAD} (F.relu, or an addition such as act(y + x), is not a module)"
)
_WEIGHT_BASED = "a weight-based criterion (l1, bn-gamma, taylor-weight) scores it"
_NO_GRADIENT = (
    "no gradient reached them in the recorded steps, though their gradients were selected "
    "(the loss does not use their output, e.g. an auxiliary head left out of it, or they "
    "are frozen)"
)
_NO_GRADIENT_TODO = "they keep all their channels; l1 or bn-gamma scores them from their weights"
_MODEL_OUTPUT = "their channels are the model's outputs"
_MODEL_OUTPUT_TODO = "tdump prune keeps them, so they need no score"
_SUMMED = "their outputs are added to other layers' (a residual +) before any activation module"


def _candidates(ctx: PlanContext, layer: str) -> list[list[str]]:
    """Tensor sets that might let a criterion plan ``layer``, preferred first."""
    flow = ctx.dataflow
    sets = [[out, grad_name(out)] for out in ctx.call_outputs(layer)]
    weight = f"{layer}.weight"
    sets += [[weight], [weight, grad_name(weight)]]
    bn = flow.following_bn(layer)
    if bn is not None:
        sets.append([f"{bn}.weight"])
    return sets


def _plans_with(crit: Criterion, ctx: PlanContext, layer: str, extra: Sequence[str]) -> bool:
    real = ctx.names

    def attrs(name: str) -> Mapping[str, Any]:
        return ctx.attrs(name) if name in real else {}

    trial = PlanContext(
        ctx.dataflow, real | frozenset(extra), ctx.mode, attrs, lambda: ctx.train_names
    )
    try:
        return crit.plan(layer, trial) is not None
    except MissingTensorError:
        return False


def unscored_reason(
    crit: Criterion,
    ctx: PlanContext,
    layer: str,
    config: Mapping[str, Any] | None = None,
    *,
    partners: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """``(why, tensors to record)`` for a layer ``crit`` could not plan.

    ``why`` says what is missing (the same words for every layer missing the same
    kind of tensor, so that :func:`skipped_notes` groups them); ``tensors`` is empty
    when no recordable tensor would help (then a weight-based criterion is the way).
    ``config``: the dump's capture settings, which tell a gradient the selection left
    out from one that never came. ``partners``: the scored layers whose channels a
    residual ``+`` adds to ``layer``'s (:meth:`~tdump._dataflow.Dataflow.summed_with`);
    the surgery prunes ``layer`` with them, so it needs no score.
    """
    if ctx.dataflow.is_model_output(layer):
        return _MODEL_OUTPUT, []
    if partners:
        return _SUMMED, []
    if _gradient_never_came(ctx, layer, config or {}):
        return _NO_GRADIENT, []
    flow = ctx.dataflow
    outputs = ctx.call_outputs(layer)
    acts = [o for o in outputs if flow.is_activation_output(o)]
    for extra in _candidates(ctx, layer):
        missing = [n for n in extra if n not in ctx.names]
        if missing and _plans_with(crit, ctx, layer, extra):
            kinds = _kinds(ctx, layer, missing)
            if kinds <= {"activations", "activation gradients"} and not acts:
                return _NO_ACTIVATION, missing  # the pre-activation is the way: say why
            return (
                f"their {' and '.join(sorted(kinds, key=_KIND_ORDER.index))} are not stored",
                missing,
            )
    if acts:
        return f"their activations (e.g. {acts[0]!r}) are not stored in a form {crit.name} uses", []
    return _NO_ACTIVATION, []


def _gradient_never_came(ctx: PlanContext, layer: str, config: Mapping[str, Any]) -> bool:
    """Whether the capture selected a gradient of ``layer`` that the dump does not hold.

    True by construction from the dump: the capture's selection takes the gradient (the
    recorded ``include_regex`` matches it, or ``include_activations`` took the output by
    its module's type, as the stored gradient of another output of that type shows),
    ``exclude_regex`` does not drop it, and gradients of the same kind were stored for
    other layers; a capture hook only writes what the backward pass computes, so this
    one never arrived.
    """
    if ctx.mode != "train":
        return False
    names, flow = ctx.names, ctx.dataflow
    include = str(config.get("include_regex") or "")
    exclude = str(config.get("exclude_regex") or "")
    taylor = config.get("reduction") == "taylor"

    def has_grad(out: str) -> bool:  # its gradient or its reduce-at-source Taylor term
        return grad_name(out) in names or out + TAYLOR_SUFFIX in names

    def by_regex(*tensors: str) -> bool:
        return bool(include) and any(re.search(include, t) for t in tensors)

    def dropped(grad: str) -> bool:
        return bool(exclude) and bool(re.search(exclude, grad))

    weight = f"{layer}.weight"
    w_grad = grad_name(weight)
    if (
        weight in names
        and w_grad not in names
        and by_regex(w_grad)
        and not dropped(w_grad)
        and any(n.endswith(".weight.grad") for n in names)
    ):
        return True
    stored_grads = [n for n in names if is_output_gradient(n)]
    for out in ctx.call_outputs(layer):
        g = grad_name(out)
        if has_grad(out) or dropped(g):
            continue
        # the Taylor term is recorded when the output or its gradient is selected
        selected = by_regex(g, out) if taylor else by_regex(g)
        if selected and stored_grads:
            return True
        typ = flow.output_type(out)
        if config.get("include_activations") and typ:
            # outputs of this type whose gradients are stored though the regex took neither
            peers = (n.rsplit(".", 1)[0] for n in stored_grads if not by_regex(n))
            if any(flow.output_type(p) == typ and not by_regex(p) for p in peers):
                return True
    return False


#: The kinds of tensor a layer's score may need, in the order a note names them.
_KIND_ORDER = (
    "weights",
    "weight gradients",
    "BatchNorm weights",
    "activations",
    "activation gradients",
)


def _kinds(ctx: PlanContext, layer: str, names: Sequence[str]) -> set[str]:
    """What ``names`` are to ``layer``: its weights, their gradients, its BatchNorm's weights, outputs."""
    weight = f"{layer}.weight"
    bn = ctx.dataflow.following_bn(layer)
    out: set[str] = set()
    for name in names:
        if name == weight:
            out.add("weights")
        elif name == grad_name(weight):
            out.add("weight gradients")
        elif bn is not None and name == f"{bn}.weight":
            out.add("BatchNorm weights")
        elif name.endswith(".grad"):
            out.add("activation gradients")
        else:
            out.add("activations")
    return out


def bn_scale_note(crit: Criterion, flow: Dataflow, layers: Sequence[str]) -> str | None:
    """The note for ``taylor-weight`` scores of convs whose output feeds a BatchNorm, else ``None``.

    BatchNorm (with batch statistics, as in training) makes the loss invariant to the
    scale of each of the conv's filters, so ``d/da L(a * W_k) = sum W_k * dL/dW_k = 0``
    at ``a = 1``: the filter sum ``taylor-weight`` squares is zero by construction and
    what is left is rounding noise (measured ``|sum W dW| / sum |W dW|`` of 1e-5 to 3e-4).
    """
    from tdump.analyze._builtin_criteria import TaylorWeight

    if not isinstance(crit, TaylorWeight):
        return None
    with_bn = [layer for layer in layers if flow.following_bn(layer) is not None]
    if not with_bn:
        return None
    shown = listed(with_bn, 6)
    n = len(with_bn)
    return (
        f"{crit.name} scores of {n} conv layer{'s' if n > 1 else ''} followed by BatchNorm "
        f"({shown}) are ~0 by construction, rounding noise: BatchNorm cancels a filter's "
        "scale, so the sum of w x dL/dw over a filter is 0; use taylor or bn-gamma for them"
    )


def include_regex(names: Iterable[str]) -> str:
    """A regex (for ``--include``) matching ``names`` and their gradients by short paths.

    >>> include_regex(["layer3.0.downsample.1.output_0", "layer3.0.bn2.output_0.grad"])
    '(?:^|\\\\.)(?:bn2\\\\.output_0|downsample\\\\.1\\\\.output_0)'
    """
    shorts: set[str] = set()
    for name in names:
        base = name[: -len(".grad")] if name.endswith(".grad") else name
        parts = base.split(".")
        # the tensor's own part (output_0, weight) and the module's name, two parts if
        # that name is a number (downsample.1, a Sequential's index)
        keep = 3 if len(parts) > 2 and parts[-2].isdigit() else 2
        shorts.add(re.escape(".".join(parts[-keep:])))
    alts = sorted(shorts)
    body = alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})"
    return rf"(?:^|\.){body}"


def skipped_notes(
    crit: Criterion,
    reasons: Mapping[str, tuple[str, list[str]]],
    recorded: str | None = None,
    *,
    by_type: bool = False,
    linears: frozenset[str] = frozenset(),
    partners: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """One note per distinct reason: which layers, why, and what would score them.

    ``recorded`` is the dump's own ``include_regex``: the hint then shows the whole
    ``--include`` to record with (the recorded selection plus the missing tensors), so
    that following it does not drop what was recorded. ``by_type``: the dump also
    selected activation modules by type (``include_activations``), which an explicit
    ``--include`` turns off, so the hint turns it back on. ``linears``: the layers
    that are hidden Linears, not convs (the note then says "layers"). ``partners``:
    the scored layers each layer's channels are added to (see :func:`unscored_reason`),
    which the note names instead of a hint.

    >>> from tdump.analyze._criteria import get_criterion
    >>> why = "no activation module receives these channels alone"
    >>> notes = skipped_notes(get_criterion("taylor"), {"c": (why, ["bn.output_0"])}, ".*relu")
    >>> print(notes[0].split("; ")[1])
    to score them, record the module outputs before the activation: tdump record --include '.*relu|(?:^|\\.)bn\\.output_0'
    """
    groups: dict[str, list[str]] = {}
    wanted: dict[str, list[str]] = {}
    for layer, (why, want) in reasons.items():
        key = f"{why}|{bool(want)}"
        groups.setdefault(key, []).append(layer)
        wanted.setdefault(key, []).extend(want)
    notes = []
    for key, layers in groups.items():
        why = key.rsplit("|", 1)[0]
        shown = listed(layers, 6)
        want = wanted[key]
        if want and why != _NO_ACTIVATION:  # name what is missing ("their weight gradients ...")
            why += " (" + ", ".join(map(repr, want[:3])) + (", ..." if len(want) > 3 else "") + ")"
        if want:
            extra = include_regex(want)
            regex = f"{recorded}|{extra}" if recorded else extra
            said = _describe(want, pre_activation=why.startswith(_NO_ACTIVATION_HEAD))
            todo = f"to score them, record {said}: tdump record --include '{regex}'"
            if by_type:
                todo += """ --config '{"include_activations": true}'"""
        elif why == _NO_GRADIENT:
            todo = _NO_GRADIENT_TODO
        elif why == _MODEL_OUTPUT:
            todo = _MODEL_OUTPUT_TODO
        elif why == _SUMMED:
            todo = _pruned_with(layers, partners or {})
        else:
            todo = _WEIGHT_BASED.replace("scores it", "scores them")
        kind = "layer" if linears.intersection(layers) else "conv layer"
        notes.append(
            f"no {crit.name} scores for {len(layers)} {kind}{'s' if len(layers) > 1 else ''} "
            f"({shown}): {why}; {todo}"
        )
    return notes


def _pruned_with(layers: Sequence[str], partners: Mapping[str, Sequence[str]]) -> str:
    """What ``tdump prune`` does with unscored ``layers`` whose channels it shares with
    scored ``partners`` (the words ``tdump loop`` uses for them, too)."""
    scored = list(dict.fromkeys(p for layer in layers for p in partners.get(layer, ())))
    whom = "it" if len(layers) == 1 else "them"
    clause = pruned_with_clause(whom, len(layers), scored)
    return f"tdump prune {clause}, so {needs_no_score(len(layers))}"


def _describe(names: Sequence[str], *, pre_activation: bool) -> str:
    if any(n.rsplit(".", 1)[-1].startswith("output_") or ".output_" in n for n in names):
        grads = any(n.endswith(".grad") for n in names)
        what = "the module outputs before the activation" if pre_activation else "those outputs"
        return what + (" with gradients" if grads else "")
    return "their weights" + (" with gradients" if any(n.endswith(".grad") for n in names) else "")


def one_step_note(crit: str, mode: str, step: int) -> str:
    """The note for scores that rest on one saved step.

    Only train step 0 is the untrained model: each mode counts its own steps, so eval
    step 0 usually ran after training steps.

    >>> one_step_note("apoz", "eval", 0)[:54]
    'apoz scores rest on one saved step (eval step 0); save'
    """
    where = "step 0, the untrained model" if mode == "train" and step == 0 else f"step {step}"
    if mode != "train":
        where = f"{mode} {where}"
    return (
        f"{crit} scores rest on one saved step ({where}); save more steps "
        "(a smaller --interval when recording) for scores that reflect training"
    )


def warn_non_finite(
    seen: Sequence[NonFinite], layers: Sequence[str], keep_nan: bool
) -> dict[int, set[int]]:
    """Warn once per layer about records holding NaN/Inf; return ``{job: steps left out}``.

    ``layers[i]`` is the layer of job ``i``. The warning points at the caller of
    :func:`~tdump.analyze.rank_table` (``stacklevel=3``), so call it from there.
    """
    by_job: dict[int, list[NonFinite]] = {}
    for nf in seen:
        by_job.setdefault(nf.job, []).append(nf)
    left_out: dict[int, set[int]] = {}
    for i, found in sorted(by_job.items()):
        steps = sorted({nf.step for nf in found})
        tensors = sorted({t for nf in found for t in nf.tensors})
        shown = ", ".join(map(str, steps[:5])) + (
            f" and {len(steps) - 5} more" if len(steps) > 5 else ""
        )
        what = (
            "its scores are NaN (keep_nan)"
            if keep_nan
            else "left out of its scores (keep_nan=True / --keep-nan keeps them)"
        )
        warnings.warn(
            f"{', '.join(tensors)} hold{'s' if len(tensors) == 1 else ''} "
            f"{sum(nf.count for nf in found)} NaN/Inf values at step{'s' if len(steps) > 1 else ''} "
            f"{shown}; layer {layers[i]!r}: {what}",
            NonFiniteWarning,
            stacklevel=3,
        )
        if not keep_nan:
            left_out[i] = set(steps)
    return left_out
