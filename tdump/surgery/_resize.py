"""Give a freshly built model the tensor shapes of a (pruned) state_dict, module by module.

No tracing: each module whose own parameters or buffers differ in shape from the
state_dict gets empty tensors of those shapes and its shape attributes fixed
(``out_channels``, ``in_channels``, ``groups``, ``num_features``, ``in_features``, ...);
``load_state_dict(strict=True)`` then fills and validates them. Loading never runs
torch.fx, so a script recorded by ``tdump record`` that calls ``tdump.load`` is not
traced behind the capture's back. Module types without a rule, and an instance or
group norm without tensors (nothing tells its ``num_features``) in a model whose shapes changed,
make :func:`resize_to` return ``None`` (the caller falls back to the channel graph).

Examples
--------
>>> import torch
>>> from torch import nn
>>> small = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)).state_dict()
>>> model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
>>> sorted(resize_to(model, small))
['0']
>>> model[0].out_channels, model[1].num_features
(5, 5)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from tdump.surgery._plan import LayerPlan
from tdump.surgery._weight_norm import weight_key, weight_norm_dim, weight_tensors

__all__ = ["match_dtypes", "resize_to"]

Shapes = dict[str, tuple[int, ...]]


class _NoRule(Exception):
    """A module whose shapes changed but which no rule covers."""


def _conv(m: nn.Module, shp: Shapes) -> None:
    conv: nn.modules.conv._ConvNd = m  # type: ignore[assignment]
    w = shp.get("weight")
    if w is None:
        raise _NoRule
    if conv.transposed and conv.groups != 1:  # weight (in, out / groups, *kernel)
        if not (conv.groups == conv.in_channels == conv.out_channels and int(w[1]) == 1):
            raise _NoRule  # only a depthwise one is pruned: its channels follow its input's
        conv.in_channels = conv.out_channels = conv.groups = int(w[0])
        return
    if conv.transposed:  # weight (in, out, *kernel)
        conv.in_channels, conv.out_channels = int(w[0]), int(w[1])
        return
    out, per_in = int(w[0]), int(w[1])
    g0, in0, out0 = conv.groups, conv.in_channels, conv.out_channels
    depthwise = g0 > 1 and g0 == in0 and out0 % in0 == 0  # (x multiplier): groups follow
    groups = out // (out0 // in0) if depthwise else g0
    conv.out_channels, conv.in_channels, conv.groups = out, per_in * groups, groups


def _norm(m: nn.Module, shp: Shapes) -> None:
    n = (shp.get("weight") or shp.get("running_mean") or (0,))[0]
    m.num_features = int(n)  # type: ignore[assignment]


def _linear(m: nn.Module, shp: Shapes) -> None:
    out, inp = shp["weight"]
    m.out_features, m.in_features = int(out), int(inp)  # type: ignore[assignment]


def _group_norm(m: nn.Module, shp: Shapes) -> None:
    gn: nn.GroupNorm = m  # type: ignore[assignment]
    per_group, n = gn.num_channels // gn.num_groups, int(shp["weight"][0])
    if n % per_group:
        raise _NoRule  # not whole groups: not a tdump plan's
    gn.num_channels, gn.num_groups = n, n // per_group  # pruning drops whole groups


def _prelu(m: nn.Module, shp: Shapes) -> None:
    m.num_parameters = int(shp["weight"][0])  # type: ignore[assignment]


def _layer_norm(m: nn.Module, shp: Shapes) -> None:
    m.normalized_shape = tuple(int(v) for v in shp["weight"])  # type: ignore[assignment]


def _untold(m: nn.Module) -> bool:
    """A norm without affine or running statistics: no tensor tells its channels."""
    own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    norms = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
    return isinstance(m, norms) and not own


#: How each module type's shape attributes follow its tensors (first isinstance match).
RULES: list[tuple[type[nn.Module], Callable[[nn.Module, Shapes], None]]] = [
    (nn.modules.conv._ConvNd, _conv),
    (nn.modules.batchnorm._NormBase, _norm),
    (nn.Linear, _linear),
    (nn.GroupNorm, _group_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.PReLU, _prelu),
    (parametrize.ParametrizationList, lambda m, shp: None),  # weight_norm's g and v
]


def _conv_plan(conv: nn.modules.conv._ConvNd, out0: int, groups0: int) -> LayerPlan | None:
    """First channels of each block kept: the plan entry of a conv whose outputs shrank."""
    out = conv.out_channels
    if out >= out0 or (groups0 > 1 and groups0 == out0):
        return None  # unchanged, or depthwise (its channels follow its inputs')
    blocks = groups0 if groups0 > 1 else 1
    per, k = out0 // blocks, out // blocks
    return LayerPlan(out0, [b * per + i for b in range(blocks) for i in range(k)])


@torch.no_grad()
def resize_to(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, LayerPlan] | None:
    """Resize ``model``'s tensors to ``sd``'s shapes; return the convs whose outputs shrank.

    Returns ``{conv: LayerPlan(original channels, first kept)}`` (empty when nothing
    changed), or ``None`` without touching ``model`` when a changed module has no rule.
    """
    changes: list[tuple[nn.Module, str, Callable[[nn.Module, Shapes], None], Shapes]] = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        own = dict(mod.named_parameters(recurse=False)) | dict(mod.named_buffers(recurse=False))
        shp = {k: tuple(sd[prefix + k].shape) for k in own if prefix + k in sd}
        if weight_norm_dim(mod) is not None:  # its shape attributes follow v's shape
            own["weight"] = weight_tensors(mod)[1]
            key = weight_key(sd, name)
            if key is not None:
                shp["weight"] = tuple(sd[key].shape)
        if all(tuple(own[k].shape) == s for k, s in shp.items()):
            continue
        rule = next((fn for kind, fn in RULES if isinstance(mod, kind)), None)
        if rule is None:
            return None
        changes.append((mod, name, rule, shp))
    if changes and any(_untold(m) for m in model.modules()):
        return None
    plan: dict[str, LayerPlan] = {}
    for mod, name, rule, shp in changes:
        before = (getattr(mod, "out_channels", 0), getattr(mod, "groups", 1))
        try:
            rule(mod, shp)
        except (_NoRule, KeyError, ValueError):
            return None
        prefix = f"{name}." if name else ""
        for key, shape in shp.items():
            if prefix + key not in sd:
                continue  # a weight_norm's computed weight: its v is resized
            old = getattr(mod, key)
            if tuple(old.shape) == shape:
                continue
            fresh = torch.empty(shape, dtype=sd[prefix + key].dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(mod, key, nn.Parameter(fresh, requires_grad=old.requires_grad))
            else:
                mod._buffers[key] = fresh
        if isinstance(mod, nn.modules.conv._ConvNd):
            entry = _conv_plan(mod, *before)
            if entry is not None:
                plan[name] = entry
    return plan


@torch.no_grad()
def match_dtypes(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer of ``model`` its ``sd`` entry's dtype.

    ``load_state_dict`` copies into the tensors a freshly built (float32) model has, so
    a bfloat16 checkpoint would leave the tensors :func:`resize_to` made in bfloat16 and
    the others in float32: a model that runs on neither. Every tensor takes the dtype it
    was saved in instead, as the model was when it was saved.

    >>> m = nn.Linear(2, 2)
    >>> match_dtypes(m, nn.Linear(2, 2).half().state_dict()); m.weight.dtype, m.bias.dtype
    (torch.float16, torch.float16)
    """
    for owner_name, owner in model.named_modules():
        prefix = f"{owner_name}." if owner_name else ""
        for table in (owner._parameters, owner._buffers):
            for key, old in table.items():
                new = sd.get(prefix + key)
                if (
                    old is None
                    or new is None
                    or new.dtype == old.dtype
                    or not (old.is_floating_point() and new.is_floating_point())
                ):
                    continue
                fresh = torch.empty(old.shape, dtype=new.dtype, device=old.device)
                table[key] = (
                    nn.Parameter(fresh, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter)
                    else fresh
                )
