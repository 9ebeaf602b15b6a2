"""Rewrite modules in place: slice weights, biases and BatchNorm buffers, fix the shape attributes.

Examples
--------
>>> import numpy as np, torch
>>> conv = torch.nn.Conv2d(3, 4, 1)
>>> rewrite_module(conv, "conv", np.array([0, 2]), None).weight.shape
torch.Size([2, 3, 1, 1])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tdump.surgery._graph import ChannelGraph
from tdump.surgery._weight_norm import rewrite_weight_normed, weight_norm_dim

__all__ = ["apply_keeps", "rewrite_module", "rewrite_tensor", "single_threaded"]


def _take(t: torch.Tensor, dim: int, idx: np.ndarray | None) -> torch.Tensor:
    if idx is None:
        return t
    return torch.index_select(t, dim, torch.from_numpy(idx).to(t.device))


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    setattr(mod, name, nn.Parameter(value.detach(), requires_grad=old.requires_grad))


@torch.no_grad()
def rewrite_tensor(owner: nn.Module, attr: str, axis: int, idx: np.ndarray | None) -> None:
    """Keep ``idx`` along ``axis`` of the parameter or buffer ``owner.attr``."""
    old = getattr(owner, attr)
    new = _take(old.detach(), axis, idx)
    if isinstance(old, nn.Parameter):
        _set_param(owner, attr, new)
    else:
        setattr(owner, attr, new)
    if isinstance(owner, nn.LayerNorm) and attr in ("weight", "bias"):
        # a LayerNorm subclass calling F.layer_norm itself (torchvision's LayerNorm2d)
        owner.normalized_shape = (int(new.shape[0]),)


@torch.no_grad()
def rewrite_module(
    mod: nn.Module, kind: str, out_idx: np.ndarray | None, in_idx: np.ndarray | None
) -> nn.Module:
    """Keep ``out_idx`` of the weight's dim 0 and ``in_idx`` of its dim 1; return ``mod``.

    ``kind`` is ``"conv"``, ``"depthwise"`` (dim 0 only; ``groups`` follows),
    ``"grouped"`` (in == out, equal removals per group; ``groups`` stays),
    ``"transposed"`` (a transposed conv: ``out_idx`` of dim 1, ``in_idx`` of dim 0),
    ``"bn"``, ``"gn"`` (a GroupNorm losing whole groups: ``num_groups`` follows),
    ``"prelu"`` (one slope per channel), ``"ln"`` (a LayerNorm over the channels) or
    ``"linear"``.
    """
    m: Any = mod  # attribute types vary by module class
    if kind in ("conv", "depthwise"):
        w = m.weight.detach()
        if (
            kind == "conv"
            and in_idx is not None
            and out_idx is not None
            and in_idx.size > out_idx.size
        ):
            w = _take(_take(w, 1, in_idx), 0, out_idx)  # shrink along the larger cut first
        else:
            w = _take(w, 0, out_idx)
            if kind == "conv":
                w = _take(w, 1, in_idx)
        _set_param(m, "weight", w)
        if m.bias is not None:
            _set_param(m, "bias", _take(m.bias, 0, out_idx))
        m.out_channels = int(w.shape[0])
        m.in_channels = int(w.shape[1]) * (int(m.groups) if kind == "conv" else int(w.shape[0]))
        if kind == "depthwise":
            m.groups = int(w.shape[0])
    elif kind == "transposed":  # weight (in, out, *kernel), groups 1
        w = _take(_take(m.weight.detach(), 0, in_idx), 1, out_idx)
        _set_param(m, "weight", w)
        if m.bias is not None:
            _set_param(m, "bias", _take(m.bias, 0, out_idx))
        m.in_channels, m.out_channels = int(w.shape[0]), int(w.shape[1])
    elif kind == "grouped":
        _rewrite_grouped(m, out_idx, in_idx)
    elif kind == "bn":
        for pname in ("weight", "bias"):
            if getattr(m, pname, None) is not None:
                _set_param(m, pname, _take(getattr(m, pname), 0, out_idx))
        for bname in ("running_mean", "running_var"):
            if getattr(m, bname, None) is not None:
                setattr(m, bname, _take(getattr(m, bname), 0, out_idx))
        m.num_features = int(out_idx.size) if out_idx is not None else m.num_features
    elif kind == "gn":
        per_group = int(m.num_channels) // int(m.num_groups)
        if m.affine:
            for pname in ("weight", "bias"):
                _set_param(m, pname, _take(getattr(m, pname), 0, out_idx))
        if out_idx is not None:
            if out_idx.size % per_group:
                raise ValueError(f"GroupNorm keeps {out_idx.size} channels, not whole groups")
            m.num_channels, m.num_groups = int(out_idx.size), int(out_idx.size) // per_group
    elif kind == "prelu":
        _set_param(m, "weight", _take(m.weight, 0, out_idx))
        m.num_parameters = int(m.weight.shape[0])
    elif kind == "ln":
        for pname in ("weight", "bias"):
            if getattr(m, pname, None) is not None:
                _set_param(m, pname, _take(getattr(m, pname), 0, out_idx))
        if out_idx is not None:
            m.normalized_shape = (int(out_idx.size),)
    elif kind == "linear":
        _set_param(m, "weight", _take(_take(m.weight, 0, out_idx), 1, in_idx))
        if m.bias is not None:
            _set_param(m, "bias", _take(m.bias, 0, out_idx))
        m.out_features, m.in_features = (int(d) for d in m.weight.shape)
    else:
        raise ValueError(f"unknown module kind {kind!r}")
    return mod


def _rewrite_grouped(m: Any, out_idx: np.ndarray | None, in_idx: np.ndarray | None) -> None:
    """Grouped conv: keep ``out_idx`` rows, and in each group's rows that group's kept inputs.

    The plan removes equal numbers from every group, so ``groups`` stays.
    """
    g = int(m.groups)
    w = m.weight.detach()
    out_g, in_g = int(m.out_channels) // g, int(w.shape[1])
    o = out_idx if out_idx is not None else np.arange(int(m.out_channels))
    i = in_idx if in_idx is not None else np.arange(int(m.in_channels))
    rows = []
    for q in range(g):
        oq = o[(o >= q * out_g) & (o < (q + 1) * out_g)]
        iq = i[(i >= q * in_g) & (i < (q + 1) * in_g)] - q * in_g
        rows.append(_take(_take(w, 0, oq), 1, iq))
    w = torch.cat(rows)
    _set_param(m, "weight", w)
    if m.bias is not None:
        _set_param(m, "bias", _take(m.bias, 0, out_idx))
    m.out_channels = int(w.shape[0])
    m.in_channels = int(w.shape[1]) * g


def apply_keeps(model: nn.Module, graph: ChannelGraph, keeps: dict[int, np.ndarray]) -> nn.Module:
    """Rewrite every module of ``model`` (the traced one, or a same-named copy) for ``keeps``.

    The copies are memory-bound, so they run on one thread: intra-op threads only add
    synchronisation (10x slower on a busy machine). The thread count is restored after.
    """
    with single_threaded():
        for name, (out_idx, in_idx) in graph.module_indices(keeps).items():
            use = graph.uses[name]
            if use.kind == "param":
                owner, _, attr = name.rpartition(".")
                rewrite_tensor(model.get_submodule(owner), attr, use.axis, out_idx)
            elif weight_norm_dim(mod := model.get_submodule(name)) is not None:
                rewrite_weight_normed(mod, use.kind, out_idx, in_idx, rewrite_module)
            else:
                rewrite_module(mod, use.kind, out_idx, in_idx)
    return model


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch CPU ops on one thread inside the block (memory-bound copies); restore after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
