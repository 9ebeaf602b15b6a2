"""How torch functions and methods move channels: the function rules of the channel graph.

:class:`FunctionRules` is mixed into :class:`tdump.surgery._graph.ChannelGraph`; each
rule maps the channel values of a call's arguments to the value of its result, merging
spaces (additions), recording per-channel parameters, or freezing what it does not
understand. The tables of channel-wise operations are in ``_ops.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from tdump.surgery._ndim import (
    SQUEEZES,
    UNSQUEEZES,
    index_keeps_channels,
    pad_dims,
    squeeze_keeps_channels,
)
from tdump.surgery._ops import (
    ELEMENTWISE,
    MERGE_OPS,
    NONTENSOR_METHODS,
    PASS_FUNCTION_NAMES,
    PASS_FUNCTIONS,
    PASS_METHODS,
)
from tdump.surgery._values import (
    NONTENSOR,
    UNKNOWN,
    ChannelsLast,
    Layout,
    ModuleUse,
    Param,
    Shuffled,
    Spaces,
    Unshuffled,
    flatten_args,
)

__all__ = ["FunctionRules"]

# Python arithmetic on sizes (``diff = x.size(2) - y.size(2)``; ``diff // 2``)
_INT_OPERATORS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.neg,
    operator.pow,
}


class FunctionRules:
    """Rules for ``call_function`` / ``call_method`` nodes and directly read parameters."""

    model: nn.Module
    uses: dict[str, ModuleUse]
    _spaces: Spaces
    _ndims: dict[fx.Node, int | None]

    def _pixel_shuffle(self, name: str, x: Any, upscale: int) -> Any:
        """``pixel_shuffle`` makes each run of ``upscale**2`` channels one channel: a conv
        reading it drops input channel ``c`` when the run ``c`` goes, so those channels go
        only in whole runs (units, as a GroupNorm's groups)."""
        factor = upscale * upscale
        if not (isinstance(x, tuple) and all(n % factor == 0 for _, n in x)):
            self._freeze_layout(x, f"{name} (pixel_shuffle) reads channels it cannot split")
            return UNKNOWN
        for space, n in x:
            self._spaces.constrain_units(space, np.arange(n) // factor, name)
        return Shuffled(x, factor)

    def _pixel_unshuffle(self, x: Layout, downscale: int) -> Unshuffled:
        """``pixel_unshuffle`` makes channel ``c`` a block of ``downscale**2`` channels:
        a conv reading it drops that block of inputs when ``c`` goes (``in_block``)."""
        return Unshuffled(x, downscale * downscale)

    def _freeze_layout(self, v: Any, reason: str) -> None:
        if isinstance(v, list) and v:  # a flattened layout
            v = v[0]
        if isinstance(v, (ChannelsLast, Shuffled, Unshuffled)):
            v = v.layout
        if isinstance(v, tuple):
            for s, _ in v:
                self._spaces.freeze(s, reason)

    def _get_attr(self, target: str) -> Any:
        try:
            obj = operator.attrgetter(target)(self.model)
        except AttributeError:
            return UNKNOWN
        return Param(target, tuple(obj.shape)) if isinstance(obj, torch.Tensor) else UNKNOWN

    def _param_follows(self, p: Param, layout: Layout, axis: int) -> None:
        """Parameter ``p`` is indexed by ``layout``'s channels along ``axis``."""
        use = self.uses.get(p.name)
        if use is None:
            owner = p.name.rpartition(".")[0]
            mod = self.model.get_submodule(owner)
            self.uses[p.name] = ModuleUse(p.name, "param", mod, layout, axis=axis)
        elif use.axis == axis and [n for _, n in use.out_layout or ()] == [n for _, n in layout]:
            self._merge([use.out_layout or (), layout], residual=False)
        else:
            reason = f"parameter {p.name} is used with different channels"
            self._freeze_layout(use.out_layout, reason)
            self._freeze_layout(layout, reason)

    def _function(self, node: fx.Node, val: Any) -> Any:
        target = node.target
        flat = flatten_args((node.args, node.kwargs))
        vals = [val(a) for a in flat]
        x = vals[0] if vals else NONTENSOR
        if node.op == "call_method" and target in NONTENSOR_METHODS:
            return NONTENSOR
        if (
            target is getattr
            and len(node.args) > 1
            and node.args[1] in ("shape", "dtype", "device")
        ):
            return NONTENSOR
        if target is operator.getitem and x is NONTENSOR:
            return NONTENSOR
        if target in _INT_OPERATORS and all(v is NONTENSOR for v in vals):
            return NONTENSOR  # every operand a size or a constant: an int, not a tensor
        if isinstance(x, (tuple, ChannelsLast)) and self._keeps_channels(node, x, val):
            return x
        if target is operator.getitem and isinstance(x, ChannelsLast):
            index = node.args[1]
            last = index[-1] if isinstance(index, tuple) and index else None
            if isinstance(last, slice) and last == slice(None):  # x[..., a:b, c:d, :]
                return x
        if (
            target in PASS_FUNCTIONS
            or getattr(target, "__name__", None) in PASS_FUNCTION_NAMES
            or (node.op == "call_method" and target in PASS_METHODS)
        ):
            return x
        if target in (torch.pixel_shuffle, torch.nn.functional.pixel_shuffle):
            factor = node.kwargs.get("upscale_factor", node.args[1] if len(node.args) > 1 else 0)
            if type(factor) is int:
                return self._pixel_shuffle(str(target.__name__), x, factor)  # type: ignore[union-attr]
        if target in (torch.pixel_unshuffle, torch.nn.functional.pixel_unshuffle):
            factor = node.kwargs.get("downscale_factor", node.args[1] if len(node.args) > 1 else 0)
            if type(factor) is int and isinstance(x, tuple):
                return self._pixel_unshuffle(x, factor)
        if target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = [val(a) for a in flatten_args(node.args[0])]
            if dim == 1 and all(isinstance(p, tuple) for p in parts):
                return tuple(seg for p in parts for seg in p)
            if dim == -1 and all(isinstance(p, ChannelsLast) for p in parts):
                return ChannelsLast(tuple(seg for p in parts for seg in p.layout))
            known = all(isinstance(p, (tuple, ChannelsLast)) for p in parts)
            why = (
                f"torch.cat along dim {dim}, not their channel axis"
                if known
                else f"torch.cat (dim {dim}) with a tensor of untracked channels (a chunk or slice of channels, a class token, ...)"
            )
            for p in parts:
                self._freeze_layout(p, why)
            return UNKNOWN
        if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            if isinstance(x, tuple) and start == 1:
                return [x]
            if isinstance(x, tuple) and isinstance(start, int) and start >= 2:
                return x  # spatial dims merged; channels stay at dim 1
        if target is torch.permute or (node.op == "call_method" and target == "permute"):
            return self._permute(node, x)
        if node.op == "call_method" and target in ("view", "reshape") and isinstance(x, tuple):
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if len(shape) == 2 and shape[1] == -1:
                return [x]
            if len(shape) >= 3 and shape[1] == sum(n for _, n in x):
                return x  # (n, C, h * w): channels stay at dim 1
        if target is torch.nn.functional.layer_norm and isinstance(x, ChannelsLast):
            return self._layer_norm(node, x, val)
        if target in ("mean", "amax", "sum") and isinstance(x, tuple):
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(dims, (tuple, list)) and all(isinstance(d, int) and d >= 2 for d in dims):
                return x
        if target in ELEMENTWISE:
            tensors = [v for v in vals if v is not NONTENSOR]
            chans = [v for v in tensors if isinstance(v, (tuple, ChannelsLast))]
            params = [v for v in tensors if isinstance(v, Param)]
            if chans and params and len(chans) + len(params) == len(tensors):
                if not all(self._param_broadcasts(p, chans[0]) for p in params):
                    return self._freeze_all(tensors, f"{target} with a parameter")
                tensors = chans
            if all(isinstance(v, ChannelsLast) for v in tensors) and tensors:
                return ChannelsLast(self._merge([v.layout for v in tensors], target in MERGE_OPS))
            if all(isinstance(v, list) for v in tensors) and tensors:  # flattened + scalar
                return tensors[0] if len(tensors) == 1 else self._freeze_all(tensors, str(target))
            if all(isinstance(v, tuple) for v in tensors) and tensors:
                return self._merge(tensors, target in MERGE_OPS)
        return self._freeze_all(vals, getattr(target, "__name__", str(target)))

    def _keeps_channels(self, node: fx.Node, x: Layout | ChannelsLast, val: Any) -> bool:
        """Padding, slicing and narrowing that leave the channel axis whole."""
        target = node.target
        source = node.args[0] if node.args else None
        ndim = self._ndims.get(source) if isinstance(source, fx.Node) else None
        if target is torch.nn.functional.pad:
            pad: Any = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
            padded = pad_dims(pad)
            if padded is None:
                return False
            if isinstance(x, ChannelsLast):  # the first pair pads the channels: (0, 0) only
                return all(type(p) is int and p == 0 for p in pad[:2])
            return ndim is not None and ndim - padded >= 2
        if isinstance(x, ChannelsLast):
            return False
        if target in SQUEEZES or target in UNSQUEEZES:
            return squeeze_keeps_channels(node, self._ndims)
        if target is operator.getitem and len(node.args) > 1:
            return index_keeps_channels(node.args[1], ndim, lambda n: val(n) is NONTENSOR)
        if target is torch.narrow or (node.op == "call_method" and target == "narrow"):
            dim: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if type(dim) is int and dim < 0 and ndim is not None:
                dim += ndim
            return type(dim) is int and (dim == 0 or dim >= 2)
        return False

    def _permute(self, node: fx.Node, x: Any) -> Any:
        """``permute`` moves a known channel axis: dim 1 <-> last."""
        given: Any = node.kwargs.get("dims", node.args[1:])
        if len(given) == 1 and isinstance(given[0], (tuple, list)):
            given = given[0]
        dims: tuple[Any, ...] = tuple(given)
        if all(isinstance(d, int) for d in dims) and len(dims) >= 2:
            last = len(dims) - 1
            dims = tuple(d % len(dims) for d in dims)
            if isinstance(x, tuple) and dims[0] == 0:
                if dims[-1] == 1:
                    return ChannelsLast(x)
                if dims[1] == 1:
                    return x
            if isinstance(x, ChannelsLast) and dims[0] == 0:
                if dims[1] == last:
                    return x.layout
                if dims[-1] == last:
                    return x
        return self._freeze_all([x], f"permute{dims}")

    def _layer_norm(self, node: fx.Node, x: ChannelsLast, val: Any) -> Any:
        """``F.layer_norm`` over the channels of a channels-last tensor: its affine follows."""
        args = list(node.args) + [None] * 4
        shape: Any = node.kwargs.get("normalized_shape", args[1])
        params = [
            val(a) for a in (node.kwargs.get("weight", args[2]), node.kwargs.get("bias", args[3]))
        ]
        total = sum(n for _, n in x.layout)
        if tuple(shape or ()) != (total,) or not all(
            p is NONTENSOR or isinstance(p, Param) for p in params
        ):
            return self._freeze_all([x], "layer_norm")
        for p in params:
            if isinstance(p, Param):
                self._param_follows(p, x.layout, 0)
        return x

    def _param_broadcasts(self, p: Param, v: Any) -> bool:
        """``p`` in an elementwise op with channel value ``v``: record how it is indexed.

        A per-channel parameter follows the channels (shape ``(C, 1, 1)`` against channels
        at dim 1 of a 4-D tensor, ``(..., C)`` against channels-last); one of size 1 along
        the channel axis broadcasts and needs nothing. Anything else: False.
        """
        layout = v.layout if isinstance(v, ChannelsLast) else v
        total = sum(n for _, n in layout)
        shape = p.shape
        if all(d == 1 for d in shape):
            return True
        if isinstance(v, ChannelsLast):
            if shape[-1] == 1:
                return True
            if shape[-1] == total:
                self._param_follows(p, layout, len(shape) - 1)
                return True
            return False
        if len(shape) in (3, 4) and shape[-3] == total and all(d == 1 for d in shape[-2:]):
            if len(shape) == 4 and shape[0] != 1:
                return False
            self._param_follows(p, layout, len(shape) - 3)
            return True
        return False

    def _freeze_all(self, vals: Sequence[Any], what: str) -> str:
        for v in vals:
            self._freeze_layout(v, f"consumed by unsupported operation '{what}'")
        return UNKNOWN

    def _merge(self, layouts: list[Layout], residual: bool) -> Any:
        first = max(layouts, key=lambda lay: sum(n for _, n in lay))
        for other in layouts:
            if other is first:
                continue
            if len(other) == 1 and other[0][1] == 1 and first[0][1] != 1:
                self._freeze_layout(
                    other, "broadcast over channels"
                )  # e.g. a 1-channel attention map
                continue
            if [n for _, n in other] != [n for _, n in first]:
                return self._freeze_all(layouts, "elementwise op on differently laid out channels")
            for (a, _), (b, _) in zip(first, other, strict=True):
                self._spaces.union(a, b, residual)
        return first
