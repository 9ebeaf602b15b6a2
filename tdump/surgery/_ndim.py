"""Tensor ranks (number of dimensions) along a traced graph, where the graph fixes them.

Padding and slicing address dimensions from the end (``F.pad(x, [l, r, t, b])`` pads the
last two, ``y[..., :h, :w]`` slices them), so whether they touch the channel axis (dim 1)
depends on the tensor's rank, which fx does not record. The channel graph needs it only
where channels are tracked, and there the rank follows from the op that made the
channels: a ``ConvNd`` output has ``N + 2`` dimensions, and channel-wise operations keep
it. Anything else is unknown (None), and an op that needs the rank then freezes the
channels it touches, as for any op the graph does not understand.

Examples
--------
>>> import torch
>>> from torch import fx
>>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU()))
>>> ndims: dict = {}
>>> for node in gm.graph.nodes:
...     ndims[node] = node_ndim(node, dict(gm.named_modules()), ndims)
>>> [ndims[n] for n in gm.graph.nodes]
[None, 4, 4, None]
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from tdump.surgery._ops import (
    ELEMENTWISE,
    PASS_FUNCTION_NAMES,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
)

__all__ = [
    "PAD_MODULES",
    "SQUEEZES",
    "UNSQUEEZES",
    "index_keeps_channels",
    "node_ndim",
    "pad_dims",
    "rank_range",
    "squeeze_keeps_channels",
]

#: Padding modules: each pads the last ``len(module.padding) // 2`` dimensions.
PAD_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd,
)
_BN_NDIM = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


def node_ndim(
    node: fx.Node,
    modules: dict[str, nn.Module],
    ndims: dict[fx.Node, int | None],
    input_ndim: int | None = None,
) -> int | None:
    """The rank of ``node``'s value where the ops before it fix it, else None.

    ``ndims`` holds the ranks of the nodes before ``node`` (filled in graph order);
    ``input_ndim`` is the first placeholder's rank when the input shape is known.
    """

    def arg(i: int) -> int | None:
        a = node.args[i] if len(node.args) > i else None
        return ndims.get(a) if isinstance(a, fx.Node) else None

    if node.op == "placeholder":
        first = next(iter(node.graph.nodes)) is node
        return input_ndim if first else None
    if node.op == "get_attr":  # a parameter or buffer read directly
        try:
            value = operator.attrgetter(str(node.target))(modules[""])
        except AttributeError:
            return None
        return value.dim() if isinstance(value, torch.Tensor) else None
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, nn.modules.conv._ConvNd):
            return len(mod.kernel_size) + 2
        for kind, nd in _BN_NDIM.items():
            if isinstance(mod, kind):
                return nd
        norms = (
            nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm,
            nn.GroupNorm,
            nn.PReLU,
        )
        if isinstance(mod, (*norms, *PAD_MODULES)):
            return arg(0)
        return arg(0) if isinstance(mod, PASS_MODULES) else None
    if node.op not in ("call_function", "call_method"):
        return None
    target: Any = node.target
    if (
        target in PASS_FUNCTIONS
        or target is torch.nn.functional.pad
        or target in (torch.narrow, "narrow")
        or getattr(target, "__name__", None) in PASS_FUNCTION_NAMES
        or (node.op == "call_method" and target in PASS_METHODS)
    ):
        return arg(0)
    if target in UNSQUEEZES and _dims_arg(node) is not None:
        below = arg(0)
        return None if below is None else below + 1
    if target is torch.cat:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        head = parts[0] if isinstance(parts, (list, tuple)) and parts else None
        return ndims.get(head) if isinstance(head, fx.Node) else None
    if target is operator.getitem and len(node.args) > 1:
        return _indexed_ndim(arg(0), node.args[1])
    if target in ELEMENTWISE:
        known = [ndims.get(a) for a in node.args if isinstance(a, fx.Node)]
        # broadcasting: the result has the most dimensions; an unknown one may have more
        return max(known) if known and None not in known else None  # type: ignore[type-var]
    return None


def _item_kind(item: Any, is_int: Callable[[fx.Node], bool]) -> str:
    if item is None:
        return "new"
    if item is Ellipsis:
        return "ellipsis"
    if isinstance(item, slice):
        return "full" if item == slice(None) else "slice"
    if isinstance(item, int) or (isinstance(item, fx.Node) and is_int(item)):
        return "int"
    return "other"  # a tensor or list index (advanced indexing moves dimensions)


def index_keeps_channels(index: Any, ndim: int | None, is_int: Callable[[fx.Node], bool]) -> bool:
    """True if ``x[index]`` leaves ``x``'s batch at dim 0 and channels whole at dim 1.

    Allowed: slicing the batch (``x[a:b]``), and slices, integers and new axes on the
    dimensions after the channels (``x[:, :, a:b]``, ``x[..., :h, :w]`` when the rank
    says the trailing items cannot reach dim 1). ``is_int`` says whether a traced value
    in the index is a plain integer (a size), not a tensor.
    """
    items = index if isinstance(index, tuple) else (index,)
    kinds = [_item_kind(i, is_int) for i in items]
    if "other" in kinds or kinds.count("ellipsis") > 1:
        return False
    head = kinds[: kinds.index("ellipsis")] if "ellipsis" in kinds else kinds
    if head[:1] not in ([], ["slice"], ["full"]) or head[1:2] not in ([], ["full"]):
        return False
    if "ellipsis" not in kinds:
        return True
    tail = kinds[len(head) + 1 :]
    if len(head) >= 2:
        return True
    consumed = sum(k != "new" for k in tail)
    return ndim is not None and ndim - consumed >= 2


def _indexed_ndim(ndim: int | None, index: Any) -> int | None:
    if ndim is None:
        return None
    items = index if isinstance(index, tuple) else (index,)
    # a traced value in the index counts as an integer: were it a tensor (advanced
    # indexing), index_keeps_channels refuses it and the rank is never asked for
    kinds = [_item_kind(i, lambda n: True) for i in items]
    if "other" in kinds:
        return None
    return ndim - kinds.count("int") + kinds.count("new")


def pad_dims(pad: Any) -> int | None:
    """How many trailing dimensions a padding spec (``[l, r, t, b, ...]``) pads."""
    if isinstance(pad, (list, tuple)) and len(pad) % 2 == 0:
        return len(pad) // 2
    return None


SQUEEZES: tuple[Any, ...] = (torch.squeeze, "squeeze")
UNSQUEEZES: tuple[Any, ...] = (torch.unsqueeze, "unsqueeze")


def _dims_arg(node: fx.Node) -> tuple[int, ...] | None:
    """The explicit dims of a ``squeeze``/``unsqueeze`` (None: every size-1 dim, or traced)."""
    given: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if type(given) is int:
        return (given,)
    if isinstance(given, (tuple, list)) and given and all(type(d) is int for d in given):
        return tuple(given)
    return None


def rank_range(node: Any, ndims: dict[fx.Node, int | None]) -> tuple[int, int] | None:
    """Bounds of ``node``'s rank: exact where :func:`node_ndim` knows it; after a
    ``squeeze(dim)``, which drops its dims only where they have size 1, a range."""
    if not isinstance(node, fx.Node):
        return None
    known = ndims.get(node)
    if known is not None:
        return known, known
    if node.op in ("call_function", "call_method") and node.args:
        dims = _dims_arg(node)
        below = rank_range(node.args[0], ndims) if dims is not None else None
        if below is not None and node.target in SQUEEZES:
            return below[0] - len(dims or ()), below[1]
        if below is not None and node.target in UNSQUEEZES:
            return below[0] + 1, below[1] + 1
    return None


def squeeze_keeps_channels(node: fx.Node, ndims: dict[fx.Node, int | None]) -> bool:
    """True if ``squeeze(dims)``/``unsqueeze(dim)`` touches only dims after the channels
    (``pool(x).squeeze(-1).squeeze(-1)`` before a Linear; an SE block's ``unsqueeze(-1)``)."""
    dims = _dims_arg(node)
    if dims is None or not node.args:
        return False
    ranks = rank_range(node.args[0], ndims)
    grow = 1 if node.target in UNSQUEEZES else 0
    for d in dims:
        if d < 0:
            if ranks is None:
                return False
            d += ranks[0] + grow  # the smallest rank gives the smallest index
        if d < 2:
            return False
    return True
