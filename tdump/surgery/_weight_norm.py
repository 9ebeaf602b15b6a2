"""Layers whose weight is ``weight_norm(g, v)``: prune ``v``, rescale ``g``, stay exact.

``weight_norm`` computes ``w = g * v / ||v||`` with one norm per slice along ``dim``
(the output channels by default; the whole tensor for ``dim=None``). Removing channels
along ``dim`` removes slices of ``g`` and ``v``; removing them along another dim
shortens every slice of ``v``, so its norm shrinks. Giving each kept slice
``g' = ||w'||`` (signed as ``g``), where ``w'`` is the kept part of the old weight,
makes the pruned layer compute exactly ``w'``; ``v`` keeps its scale, so training
goes on as before. Both spellings are handled: ``torch.nn.utils.parametrizations.
weight_norm`` (``parametrizations.weight.original0/1``) and the older hook
``torch.nn.utils.weight_norm`` (``weight_g`` / ``weight_v``). ``spectral_norm`` and
other computed weights are not: pruning changes a spectral norm, so no rescaling is
exact; :func:`computed_weight` tells the graph to leave them alone.

Examples
--------
>>> import numpy as np, torch
>>> from torch.nn.utils.parametrizations import weight_norm
>>> from tdump.surgery._apply import rewrite_module
>>> conv = weight_norm(torch.nn.Conv2d(4, 3, 1))
>>> x = torch.randn(1, 4, 2, 2)
>>> kept = torch.nn.functional.conv2d(x[:, [0, 2]], conv.weight[:, [0, 2]], conv.bias)
>>> small = rewrite_weight_normed(conv, "conv", None, np.array([0, 2]), rewrite_module)
>>> torch.allclose(small(x[:, [0, 2]]), kept, atol=1e-6), weight_norm_dim(small)
(True, 0)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

from tdump._modtypes import WEIGHT_NORM_PARAMS

__all__ = [
    "computed_weight",
    "copy_model",
    "refresh_weights",
    "rewrite_weight_normed",
    "weight_key",
    "weight_norm_dim",
    "weight_tensors",
]

Rewrite = Callable[[nn.Module, str, "np.ndarray | None", "np.ndarray | None"], nn.Module]


def _hooks(mod: nn.Module) -> list[WeightNorm]:
    return [h for h in mod._forward_pre_hooks.values() if isinstance(h, WeightNorm)]


def weight_norm_dim(mod: nn.Module) -> int | None:
    """``dim`` of the weight_norm that alone computes ``mod.weight`` (-1: whole tensor), or
    None when ``mod.weight`` is not computed that way."""
    if parametrize.is_parametrized(mod):
        plist: Any = mod.parametrizations
        if set(plist.keys()) != {"weight"} or len(plist["weight"]) != 1:
            return None
        step = plist["weight"][0]
        return int(step.dim) if type(step).__name__ == "_WeightNorm" else None
    hooks = _hooks(mod)
    if len(hooks) == 1 and hooks[0].name == "weight":
        return int(hooks[0].dim)
    return None


def computed_weight(mod: nn.Module) -> bool:
    """Whether ``mod``'s tensors are computed from others in a way pruning cannot follow
    (``spectral_norm``, any other parametrization; a weight_norm of ``weight`` can)."""
    computed = parametrize.is_parametrized(mod) or any(
        hasattr(h, "name") and hasattr(mod, f"{h.name}_orig")  # the old spectral_norm hook
        for h in mod._forward_pre_hooks.values()
    )
    return (computed or bool(_hooks(mod))) and weight_norm_dim(mod) is None


def weight_tensors(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, v)`` of a weight-normed ``mod``."""
    if parametrize.is_parametrized(mod):
        weight: Any = mod.parametrizations["weight"]  # type: ignore[index]
        return weight.original0, weight.original1
    return mod.weight_g, mod.weight_v  # type: ignore[return-value]


def weight_key(sd: Mapping[str, torch.Tensor], layer: str) -> str | None:
    """The ``sd`` key holding ``layer``'s weight, or its weight_norm direction ``v``
    (same shape): ``{layer}.weight``, ``.parametrizations.weight.original1`` or ``.weight_v``.

    A ``v`` counts only beside its ``g``: spectral_norm's ``weight_v`` is a vector.
    """
    prefix = f"{layer}." if layer else ""
    if prefix + "weight" in sd:
        return prefix + "weight"
    for g, v in WEIGHT_NORM_PARAMS:
        if prefix + g in sd and prefix + v in sd:
            return prefix + v
    return None


def _slice_sums(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dim but ``dim`` (all of them for -1), shaped like weight_norm's ``g``."""
    if dim == -1:
        return t.sum()
    return t.sum(dim=[d for d in range(t.dim()) if d != dim % t.dim()], keepdim=True)


def _unparametrize(mod: nn.Module) -> None:
    """``remove_parametrizations(mod, "weight")`` without its ``delattr`` on the class:
    a deep copy shares its parametrized class with the original, which would lose its
    ``weight`` too. ``weight`` is the only parametrized tensor (:func:`weight_norm_dim`)."""
    weight = torch.Tensor.detach(mod.weight)  # type: ignore[arg-type]
    mod.__class__ = type(mod).__bases__[0]  # the class before weight_norm
    del mod._modules["parametrizations"]
    mod.weight = nn.Parameter(weight)


@torch.no_grad()
def rewrite_weight_normed(
    mod: nn.Module,
    kind: str,
    out_idx: np.ndarray | None,
    in_idx: np.ndarray | None,
    rewrite: Rewrite,
) -> nn.Module:
    """``rewrite(mod, kind, out_idx, in_idx)`` for a weight-normed ``mod``, kept exact.

    The weight_norm is taken off, ``rewrite`` slices a copy holding the computed weight
    (giving ``w'``) and ``mod`` holding ``v`` (giving ``v'``), and the weight_norm is put
    back in the same spelling with ``g'`` from ``w'``: ``g' * v' / ||v'|| == w'``.
    """
    dim = weight_norm_dim(mod)
    if dim is None:
        raise ValueError(f"{type(mod).__name__} is not weight-normed")
    g, v = weight_tensors(mod)
    hooked = not parametrize.is_parametrized(mod)
    grads = (g.requires_grad, v.requires_grad)
    g_dtype = g.dtype
    if hooked:
        remove_weight_norm(mod, "weight")
    else:
        _unparametrize(mod)
    twin: Any = rewrite(copy.deepcopy(mod), kind, out_idx, in_idx)  # holds w'
    mod.weight = nn.Parameter(v.detach().clone())
    small: Any = rewrite(mod, kind, out_idx, in_idx)  # holds v'
    w64, v64 = twin.weight.detach().double(), small.weight.detach().double()
    norm = torch.norm_except_dim(w64, 2, dim)
    g_new = torch.where(_slice_sums(w64 * v64, dim) < 0, -norm, norm).to(g_dtype)
    if hooked:
        with warnings.catch_warnings():  # the model was written with the old hook: keep it
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(mod, "weight", dim)
    else:
        parametrizations.weight_norm(mod, "weight", dim)
    new_g, new_v = weight_tensors(mod)
    new_g.copy_(g_new.reshape(new_g.shape))
    new_g.requires_grad_(grads[0])
    new_v.requires_grad_(grads[1])
    refresh_weights(mod)  # the hook computed its weight from the g it made
    return mod


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for the old ``weight_norm`` hook.

    That hook keeps the weight it computed as an autograd non-leaf, which ``deepcopy``
    refuses; the weight is detached first (the hook computes it again at every forward).
    """
    for mod in model.modules():
        for hook in _hooks(mod):
            weight = getattr(mod, hook.name, None)
            if isinstance(weight, torch.Tensor) and not weight.is_leaf:
                setattr(mod, hook.name, weight.detach())
    return copy.deepcopy(model)


@torch.no_grad()
def refresh_weights(model: nn.Module) -> None:
    """Compute again the weights the old ``weight_norm`` hook keeps (it does so only at a
    forward): after ``load_state_dict`` they still hold the model's initial values."""
    for mod in model.modules():
        for hook in _hooks(mod):
            setattr(mod, hook.name, hook.compute_weight(mod))
