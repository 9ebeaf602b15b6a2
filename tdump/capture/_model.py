"""Model facts the hook needs: unwrapping, the module tree, tensor dimension names, snapshots.

Examples
--------
>>> from torch import nn

if TYPE_CHECKING:
    from tdump.capture._writer import HostBuffers
>>> tree = module_tree(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> tree["0"]["type"], tree["0"]["params"]["weight"], tree["0"]["config"]["out_channels"]
('torch.nn.modules.conv.Conv2d', [8, 3, 3, 3], 8)
>>> output_dims(4), param_dims("weight", 4)
(('batch', 'channel', 'y', 'x'), ('out_channel', 'in_channel', 'ky', 'kx'))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdump._modtypes import type_name

if TYPE_CHECKING:
    from tdump.capture._writer import HostBuffers

__all__ = [
    "CONFIG_KEYS",
    "channels_first",
    "first_tensor",
    "fx_tracing",
    "module_tree",
    "output_dims",
    "param_count",
    "param_dims",
    "reduce_channels",
    "reduced_dims",
    "snapshot",
    "unwrap",
]

#: Constructor facts copied into ``modules[path]["config"]`` when a module has them.
CONFIG_KEYS: tuple[str, ...] = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "num_features",
    "in_features",
    "out_features",
    "eps",
    "inplace",
    "upscale_factor",
)


def _fx_flag() -> Any:
    try:
        from torch.fx import _symbolic_trace as st
    except ImportError:  # pragma: no cover - torch without fx
        return lambda: False
    # the private getter skips the public function's deprecation warning on every call
    return getattr(st, "_get_is_fx_tracing", None) or getattr(st, "is_fx_tracing", lambda: False)


_FX_TRACING = _fx_flag()


def fx_tracing() -> bool:
    """Whether torch.fx is tracing in this thread (``symbolic_trace``, ``tdump.load``, export).

    Module calls made while tracing see proxies, not tensors: capture ignores them.

    >>> fx_tracing()
    False
    """
    return bool(_FX_TRACING())


def param_count(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
            continue
        return module


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return str(value)


def module_tree(root: nn.Module) -> dict[str, dict[str, Any]]:
    """``{path: {"type", "params", "buffers", "config"}}`` for every module (root is ``""``)."""
    tree: dict[str, dict[str, Any]] = {}
    for path, mod in root.named_modules(remove_duplicate=False):
        config = {k: _jsonable(getattr(mod, k)) for k in CONFIG_KEYS if hasattr(mod, k)}
        tree[path] = {
            "type": type_name(type(mod)),
            "params": {n: list(p.shape) for n, p in mod.named_parameters(recurse=False)},
            "buffers": {
                n: list(b.shape) for n, b in mod.named_buffers(recurse=False) if b is not None
            },
            "config": config,
        }
    return tree


def output_dims(ndim: int, channels_last: bool = False) -> tuple[str, ...]:
    """Dimension names of a module output / activation with ``ndim`` dims.

    ``channels_last``: the features are the last dim, as a Linear's on a ``(batch,
    tokens, features)`` tensor.

    >>> output_dims(4), output_dims(3, channels_last=True)
    (('batch', 'channel', 'y', 'x'), ('batch', 'x', 'feature'))
    """
    if channels_last and ndim >= 3:
        return ("batch", *output_dims(ndim)[2:], "feature")
    known = {
        0: (),
        1: ("batch",),
        2: ("batch", "feature"),
        3: ("batch", "channel", "x"),
        4: ("batch", "channel", "y", "x"),
        5: ("batch", "channel", "z", "y", "x"),
    }
    return known.get(ndim, ("batch", *(f"dim_{i}" for i in range(1, ndim))))


def param_dims(name: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of a parameter or buffer (``name`` is its local name)."""
    if ndim == 0:
        return ()
    if ndim == 1:
        return ("channel",)
    if ndim == 2:
        return ("out_feature", "in_feature")
    spatial = {3: ("kx",), 4: ("ky", "kx"), 5: ("kz", "ky", "kx")}.get(ndim)
    if spatial is not None:
        return ("out_channel", "in_channel", *spatial)
    return tuple(f"dim_{i}" for i in range(ndim))


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module returned (first tensor of a tuple/list/dict), or ``None``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, torch.Tensor):
                return v
    return None


def reduced_dims(ndim: int, channels_last: bool = False) -> tuple[str, ...]:
    """Dimension names of a per-example per-channel reduction of an ``ndim``-dim output.

    >>> reduced_dims(4), reduced_dims(3, channels_last=True)
    (('batch', 'channel'), ('batch', 'feature'))
    """
    return ("batch", "feature") if channels_last and ndim >= 3 else output_dims(ndim)[:2]


def reduce_channels(t: torch.Tensor, how: str, channels_last: bool = False) -> torch.Tensor:
    """Per-example per-channel reduction over the spatial dims (dims >= 2).

    ``mean``, ``abs_mean``, ``l2`` (root of the sum of squares), ``zero_fraction``
    (the fraction of exact zeros: what APoZ averages). Tensors with fewer than 3 dims
    are returned as they are (``abs`` for ``abs_mean``, 0/1 for ``zero_fraction``).
    ``channels_last``: the channels are the last dim (reduced over dims 1 to -2).
    """
    t = channels_first(t.detach(), channels_last)
    if how == "zero_fraction":
        zeros = (t == 0).float()
        return zeros.mean(tuple(range(2, t.dim()))) if t.dim() > 2 else zeros
    if how == "abs_mean":
        t = t.abs()
    dims = tuple(range(2, t.dim()))
    if how == "l2":
        return t.float().pow(2).sum(dims).sqrt() if dims else t.abs()
    return t.float().mean(dims) if dims else t.clone()


def channels_first(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` with its last dim moved to dim 1 when ``channels_last`` (a view), else ``t``."""
    return t.movedim(-1, 1) if channels_last and t.dim() > 2 else t


def snapshot(
    t: torch.Tensor, dtype: torch.dtype | None = None, buffers: HostBuffers | None = None
) -> torch.Tensor:
    """A private host copy of ``t`` as it is now, into a reused buffer of ``buffers`` if given.

    On CUDA the copy goes non-blocking into pinned memory, queued on the current
    stream: the caller records an event on that stream after its copies and waits on
    it before reading (:class:`~tdump.capture._step.SavedStep` records one per saved
    step). On the CPU it is a plain copy (values that in-place ops overwrite later
    are kept).
    """
    t = t.detach()
    cast = dtype if dtype is not None and t.is_floating_point() else None
    cuda = t.device.type == "cuda"
    if buffers is not None and (cuda or t.device.type == "cpu"):
        return buffers.copy_of(t, cast)
    if cast is not None and t.dtype != cast:
        t = t.to(cast)  # a new tensor: serves as the copy, halves the transfer
        fresh = True
    else:
        fresh = False
    if cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
    if t.device.type != "cpu":
        return t.to("cpu")
    return t if fresh else t.clone()
