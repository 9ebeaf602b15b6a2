"""The channel dependency graph, built once from a torch.fx trace.

Every tensor in the traced forward gets a *channel layout*: the list of segments its
channel dimension (dim 1) is made of. A segment is ``(space, length)``: ``length``
channels that belong to a *channel space*. A conv creates a new space for its output
channels; channel-wise modules and functions (BatchNorm, ReLU, pooling, dropout)
pass the layout through; ``torch.cat(..., dim=1)`` concatenates layouts (channel
offsets); residual additions merge the spaces they add (union-find), so all convs
summed into one tensor end up in one space: a *group*. A depthwise conv merges its
input and output spaces; a grouped conv's outputs form *blocks* (equal removals per
group) and its inputs are frozen. Anything the graph does not understand (an unknown
op, the model output, an ignored module) *freezes* the spaces it touches: frozen
groups are never pruned. No rule names an architecture. The model is traced in eval
and in training mode, and both graphs feed the same spaces, so branches that run only
in training (auxiliary classifiers) are pruned consistently too.

Examples
--------
>>> import torchvision
>>> g = build_graph(torchvision.models.resnet18())
>>> [grp.members for grp in g.groups if len(grp.members) > 1][0][:2]
['conv1', 'layer1.0.conv2']
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from tdump.errors import ConfigError, UntraceableModelError
from tdump.surgery._ops import (
    ELEMENTWISE,
    MERGE_OPS,
    NONTENSOR_METHODS,
    PASS_FUNCTION_NAMES,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
)

__all__ = ["ChannelGraph", "Group", "ModuleUse", "build_graph"]

Layout = tuple[tuple[int, int], ...]  # ((space, length), ...)
_UNKNOWN = "unknown"  # a tensor whose channel layout we do not know
_NONTENSOR = "nontensor"  # a value that is not a channel-carrying tensor (sizes, dtypes)


@dataclass
class ModuleUse:
    """How one module's tensors map to channel spaces.

    ``kind`` is ``"conv"``, ``"depthwise"``, ``"grouped"`` (in == out channels, one
    space), ``"bn"``, ``"ln"`` (LayerNorm over the
    channels), ``"linear"`` or ``"param"`` (a tensor attribute read directly, e.g. a
    per-channel scale; ``name`` is its qualified name, sliced along ``axis``).
    ``out_layout`` is the layout of the dim-0 axis of the weight (conv out channels, BN
    and LN features, linear out features); ``in_layout`` that of the weight's dim 1
    (conv in channels, linear in features, expanded by ``in_block`` features per
    channel after a flatten). ``out_value`` is what a call returns (for repeated calls).
    """

    name: str
    kind: str
    module: nn.Module
    out_layout: Layout | None = None
    in_layout: Layout | None = None
    in_block: int = 1
    axis: int = 0
    out_value: Any = None


@dataclass(frozen=True)
class _Last:
    """A tensor whose channels are its **last** axis (channels-last), e.g. after a permute."""

    layout: Layout


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer read directly (``get_attr``): its qualified name and shape."""

    name: str
    shape: tuple[int, ...]


@dataclass
class Group:
    """Coupled output channels: all convs in ``members`` lose the same channel indices.

    ``size`` channels; ``frozen`` (with ``reason``) means the group is left alone;
    ``residual`` says the coupling came through an addition (a residual group);
    ``blocks > 1`` (a grouped conv's outputs) means channels must go in equal numbers
    from each of ``blocks`` contiguous blocks.
    """

    gid: int
    size: int
    members: list[str]
    frozen: bool = False
    reason: str = ""
    residual: bool = False
    blocks: int = 1


@dataclass
class _Spaces:
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)
    residual: set[int] = field(default_factory=set)
    blocks: dict[int, int] = field(default_factory=dict)  # root -> equal blocks (grouped convs)

    def new(self, n: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(n)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def freeze(self, s: int, reason: str) -> None:
        self.frozen.setdefault(self.find(s), reason)

    def union(self, a: int, b: int, residual: bool) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, "channel counts differ across an addition")
            self.freeze(rb, "channel counts differ across an addition")
            return
        self.parent[rb] = ra
        blocks = math.lcm(self.blocks.pop(ra, 1), self.blocks.pop(rb, 1))
        if blocks > 1:
            self.blocks[ra] = blocks
            if self.size[ra] % blocks:
                self.freeze(ra, "grouped convs with incompatible groups share these channels")
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if residual or rb in self.residual:
            self.residual.add(ra)
        self.residual.discard(rb)


class _Tracer(fx.Tracer):
    """fx tracer that keeps ignored modules whole and remembers where tracing failed."""

    def __init__(self, ignore: re.Pattern[str] | None) -> None:
        super().__init__()
        self.ignore = ignore
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            self.ignore is not None
            and module_qualified_name
            and self.ignore.search(module_qualified_name)
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def trace(
    model: nn.Module, ignore: re.Pattern[str] | None = None, *, training: bool = False
) -> fx.Graph:
    """Symbolically trace ``model`` in eval (or ``training``) mode.

    Raises :class:`UntraceableModelError` naming the module fx failed in.
    """
    tracer = _Tracer(ignore)
    was_training = model.training
    model.train(training)
    try:
        return tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = tracer.failed_in or ""
        label = (
            f"module '{where}' ({type(model.get_submodule(where)).__name__})"
            if where
            else (f"model {type(model).__name__}")
        )
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UntraceableModelError(
            f"torch.fx cannot trace {label}: {first}; pass ignore=REGEX (--ignore REGEX) "
            f"matching it to keep it whole and leave its channels alone"
        ) from None
    finally:
        model.train(was_training)


def _flatten_args(args: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(args, (list, tuple)):
        for a in args:
            out.extend(_flatten_args(a))
    elif isinstance(args, dict):
        for a in args.values():
            out.extend(_flatten_args(a))
    else:
        out.append(args)
    return out


def _is_depthwise(conv: nn.Module) -> bool:
    groups = int(conv.groups)  # type: ignore[arg-type]
    return groups > 1 and groups == conv.in_channels == conv.out_channels


class ChannelGraph:
    """Channel spaces, groups and module uses of one traced model.

    Build it with :func:`build_graph`; query :attr:`groups`, :meth:`group_of` and
    :meth:`module_indices` (which channels each module keeps, given per-group keeps).
    """

    def __init__(self, model: nn.Module, ignore: str | None = None) -> None:
        try:
            pattern = re.compile(ignore) if ignore else None
        except re.error as exc:
            raise ConfigError(f"ignore is not a valid regex ({exc}): {ignore}") from None
        self.model = model
        self.ignore = ignore
        self._spaces = _Spaces()
        self.uses: dict[str, ModuleUse] = {}
        self._conv_space: dict[str, int] = {}
        self._called: set[str] = set()  # modules called so far in the graph being read
        self.notes: list[str] = []
        # Both graphs: the inference one, and the training one, whose train-only branches
        # (auxiliary heads) read channels too. A module seen in the first keeps its spaces.
        graphs: list[fx.Graph] = []
        failed: list[tuple[bool, UntraceableModelError]] = []
        for training in (False, True):
            try:
                graphs.append(trace(model, pattern, training=training))
            except UntraceableModelError as err:
                failed.append((training, err))
        if not graphs:
            raise failed[0][1]
        for training, error in failed:
            mode = "training" if training else "inference"
            self.notes.append(f"only one mode traced; the {mode} graph failed: {error}")
        for graph in graphs:
            self._called = set()
            self._build(graph, pattern)
        self._finish()

    # ------------------------------------------------------------------ building
    def _freeze_layout(self, v: Any, reason: str) -> None:
        if isinstance(v, list) and v:  # a flattened layout
            v = v[0]
        if isinstance(v, _Last):
            v = v.layout
        if isinstance(v, tuple):
            for s, _ in v:
                self._spaces.freeze(s, reason)

    def _build(self, graph: fx.Graph, ignore: re.Pattern[str] | None) -> None:
        env: dict[fx.Node, Any] = {}
        modules = dict(self.model.named_modules())

        def val(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return env[a]
            return _NONTENSOR

        for node in graph.nodes:
            op = node.op
            if op == "placeholder":
                env[node] = _UNKNOWN
            elif op == "get_attr":
                env[node] = self._get_attr(str(node.target))
            elif op == "output":
                for a in _flatten_args(node.args):
                    self._freeze_layout(val(a), "reaches the model output")
            elif op == "call_module":
                mod = modules[node.target]
                args = [val(a) for a in _flatten_args((node.args, node.kwargs))]
                ignored = ignore is not None and ignore.search(node.target) is not None
                env[node] = self._module(node.target, mod, args, ignored)
            else:
                env[node] = self._function(node, val)

    def _get_attr(self, target: str) -> Any:
        try:
            obj = self.model
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return _UNKNOWN
        return _Param(target, tuple(obj.shape)) if isinstance(obj, torch.Tensor) else _UNKNOWN

    def _param_follows(self, p: _Param, layout: Layout, axis: int) -> None:
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

    def _module(self, name: str, mod: nn.Module, args: list[Any], ignored: bool) -> Any:
        x = args[0] if args else _UNKNOWN
        tensors = [a for a in args if a is not _NONTENSOR]
        if ignored:
            for a in tensors:
                self._freeze_layout(a, f"ignored module {name}")
            return _UNKNOWN
        if name in self.uses:
            return self._reuse(self.uses[name], x)
        if name in self._called and not isinstance(mod, PASS_MODULES):
            for a in tensors:  # called before on channels that could not change
                self._freeze_layout(a, f"{name} is called on channels that cannot change")
            return _UNKNOWN
        self._called.add(name)
        sp = self._spaces
        if isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(
            mod, nn.modules.conv._ConvTransposeNd
        ):
            layout = x if isinstance(x, tuple) else None
            if layout is None:
                self._freeze_layout(x, f"{name} reads a flattened tensor")
            elif sum(n for _, n in layout) != mod.in_channels:
                self._freeze_layout(layout, f"{name} in_channels do not match its input")
                layout = None
            if _is_depthwise(mod) and layout is not None:
                self.uses[name] = ModuleUse(
                    name, "depthwise", mod, layout, layout, out_value=layout
                )
                if len(layout) == 1:
                    self._conv_space[name] = layout[0][0]
                return layout
            if (
                mod.groups != 1
                and layout is not None
                and len(layout) == 1
                and mod.in_channels == mod.out_channels
            ):
                return self._grouped(name, mod, layout)
            space = sp.new(int(mod.out_channels))
            self._conv_space[name] = space
            if mod.groups != 1:
                # outputs may go in equal numbers from each of the `groups` blocks, so
                # `groups` still divides both counts; the inputs stay
                if _is_depthwise(mod):
                    sp.freeze(space, f"depthwise conv {name} over channels that cannot change")
                else:
                    sp.blocks[space] = int(mod.groups)
                self._freeze_layout(layout, f"grouped conv {name} (groups={mod.groups}) reads them")
                layout = None
            out: Layout = ((space, int(mod.out_channels)),)
            self.uses[name] = ModuleUse(name, "conv", mod, out, layout, out_value=out)
            return out
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if isinstance(x, tuple) and sum(n for _, n in x) == mod.num_features:
                self.uses[name] = ModuleUse(name, "bn", mod, x, out_value=x)
                return x
            self._freeze_layout(x, f"{name} does not match its input")
            return _UNKNOWN
        if isinstance(mod, nn.Linear):
            # a Linear reads the last axis: a 2-D (N, C) tensor, a flattened map, or a
            # channels-last tensor; its out features are a new space, laid out the same way
            layout, block = None, 0
            if isinstance(x, (tuple, _Last)) or (isinstance(x, list) and x):
                layout = x.layout if isinstance(x, _Last) else x if isinstance(x, tuple) else x[0]
                total = sum(n for _, n in layout)
                block = mod.in_features // total if mod.in_features % total == 0 else 0
                if not (block == 1 or (isinstance(x, list) and block > 1)):
                    self._freeze_layout(layout, f"{name} in_features do not match its input")
                    layout = None
            else:
                self._freeze_layout(x, f"{name} reads a tensor of unknown channels")
            space = sp.new(int(mod.out_features))
            self._conv_space[name] = space
            lay: Layout = ((space, int(mod.out_features)),)
            value = _Last(lay) if isinstance(x, _Last) else lay
            self.uses[name] = ModuleUse(name, "linear", mod, lay, layout, max(block, 1), 0, value)
            return value
        if isinstance(mod, nn.LayerNorm):
            shape = tuple(mod.normalized_shape)
            if isinstance(x, _Last) and shape == (sum(n for _, n in x.layout),):
                self.uses[name] = ModuleUse(name, "ln", mod, x.layout, out_value=x)
                return x
        if isinstance(mod, nn.Flatten):
            if isinstance(x, tuple) and mod.start_dim == 1:
                return [x]
            self._freeze_layout(x, f"flatten {name}")
            return _UNKNOWN
        if isinstance(mod, PASS_MODULES):
            return x
        for a in tensors:
            self._freeze_layout(a, f"unsupported module {name} ({type(mod).__name__})")
        return _UNKNOWN

    def _grouped(self, name: str, mod: nn.Module, layout: Layout) -> Layout:
        """A grouped conv with ``in == out`` channels (ResNeXt, RegNet): input channel k and
        output channel k lie in the same group, so they go together (one space, like a
        depthwise conv), in equal numbers from each of the ``groups`` blocks.
        """
        sp = self._spaces
        space = layout[0][0]
        root = sp.find(space)
        blocks = math.lcm(sp.blocks.get(root, 1), int(mod.groups))  # type: ignore[arg-type]
        sp.blocks[root] = blocks
        if sp.size[root] % blocks:
            sp.freeze(root, f"grouped conv {name} (groups={mod.groups}) cannot split them evenly")
        self.uses[name] = ModuleUse(name, "grouped", mod, layout, layout, out_value=layout)
        self._conv_space[name] = space
        return layout

    def _reuse(self, use: ModuleUse, x: Any) -> Any:
        """A module called again (shared weights): both calls' channels must go together."""
        seen = use.out_layout if use.kind in ("bn", "ln") else use.in_layout
        new = x[0] if use.kind == "linear" and isinstance(x, list) and x else x
        if isinstance(new, _Last) and use.kind in ("linear", "ln"):
            new = new.layout
        if (
            seen is not None
            and isinstance(new, tuple)
            and [n for _, n in new] == [n for _, n in seen]
        ):
            self._merge([seen, new], residual=False)
        elif seen is None and use.kind in ("conv", "linear"):
            # its inputs were frozen at the first call (grouped conv, flattened input):
            # so are this call's; its outputs are still its own
            self._freeze_layout(new, f"{use.name} reads them (inputs left alone)")
        else:
            reason = f"{use.name} is called on differently laid out inputs"
            for lay in (seen, new, use.out_layout):
                self._freeze_layout(lay, reason)
        return use.out_value

    def _function(self, node: fx.Node, val: Any) -> Any:
        target = node.target
        flat = _flatten_args((node.args, node.kwargs))
        vals = [val(a) for a in flat]
        x = vals[0] if vals else _NONTENSOR
        if node.op == "call_method" and target in NONTENSOR_METHODS:
            return _NONTENSOR
        if (
            target is getattr
            and len(node.args) > 1
            and node.args[1] in ("shape", "dtype", "device")
        ):
            return _NONTENSOR
        if target is operator.getitem and x is _NONTENSOR:
            return _NONTENSOR
        if target is operator.getitem and isinstance(x, _Last):
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
        if target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = [val(a) for a in _flatten_args(node.args[0])]
            if dim == 1 and all(isinstance(p, tuple) for p in parts):
                return tuple(seg for p in parts for seg in p)
            if dim == -1 and all(isinstance(p, _Last) for p in parts):
                return _Last(tuple(seg for p in parts for seg in p.layout))
            known = all(isinstance(p, (tuple, _Last)) for p in parts)
            why = (
                f"torch.cat along dim {dim}, not their channel axis"
                if known
                else f"torch.cat (dim {dim}) with a tensor of unknown channels (a class token?)"
            )
            for p in parts:
                self._freeze_layout(p, why)
            return _UNKNOWN
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
        if target is torch.nn.functional.layer_norm and isinstance(x, _Last):
            return self._layer_norm(node, x, val)
        if target in ("mean", "amax", "sum") and isinstance(x, tuple):
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(dims, (tuple, list)) and all(isinstance(d, int) and d >= 2 for d in dims):
                return x
        if target in ELEMENTWISE:
            tensors = [v for v in vals if v is not _NONTENSOR]
            chans = [v for v in tensors if isinstance(v, (tuple, _Last))]
            params = [v for v in tensors if isinstance(v, _Param)]
            if chans and params and len(chans) + len(params) == len(tensors):
                if not all(self._param_broadcasts(p, chans[0]) for p in params):
                    return self._freeze_all(tensors, f"{target} with a parameter")
                tensors = chans
            if all(isinstance(v, _Last) for v in tensors) and tensors:
                return _Last(self._merge([v.layout for v in tensors], target in MERGE_OPS))
            if all(isinstance(v, list) for v in tensors) and tensors:  # flattened + scalar
                return tensors[0] if len(tensors) == 1 else self._freeze_all(tensors, str(target))
            if all(isinstance(v, tuple) for v in tensors) and tensors:
                return self._merge(tensors, target in MERGE_OPS)
        return self._freeze_all(vals, getattr(target, "__name__", str(target)))

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
                    return _Last(x)
                if dims[1] == 1:
                    return x
            if isinstance(x, _Last) and dims[0] == 0:
                if dims[1] == last:
                    return x.layout
                if dims[-1] == last:
                    return x
        return self._freeze_all([x], f"permute{dims}")

    def _layer_norm(self, node: fx.Node, x: _Last, val: Any) -> Any:
        """``F.layer_norm`` over the channels of a channels-last tensor: its affine follows."""
        args = list(node.args) + [None] * 4
        shape: Any = node.kwargs.get("normalized_shape", args[1])
        params = [
            val(a) for a in (node.kwargs.get("weight", args[2]), node.kwargs.get("bias", args[3]))
        ]
        total = sum(n for _, n in x.layout)
        if tuple(shape or ()) != (total,) or not all(
            p is _NONTENSOR or isinstance(p, _Param) for p in params
        ):
            return self._freeze_all([x], "layer_norm")
        for p in params:
            if isinstance(p, _Param):
                self._param_follows(p, x.layout, 0)
        return x

    def _param_broadcasts(self, p: _Param, v: Any) -> bool:
        """``p`` in an elementwise op with channel value ``v``: record how it is indexed.

        A per-channel parameter follows the channels (shape ``(C, 1, 1)`` against channels
        at dim 1 of a 4-D tensor, ``(..., C)`` against channels-last); one of size 1 along
        the channel axis broadcasts and needs nothing. Anything else: False.
        """
        layout = v.layout if isinstance(v, _Last) else v
        total = sum(n for _, n in layout)
        shape = p.shape
        if all(d == 1 for d in shape):
            return True
        if isinstance(v, _Last):
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
        return _UNKNOWN

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

    # ------------------------------------------------------------------ queries
    def _finish(self) -> None:
        sp = self._spaces
        by_root: dict[int, Group] = {}
        self.groups: list[Group] = []
        self._group_of_space: dict[int, Group] = {}
        for name, space in self._conv_space.items():
            root = sp.find(space)
            grp = by_root.get(root)
            if grp is None:
                grp = Group(
                    len(self.groups),
                    sp.size[root],
                    [],
                    root in sp.frozen,
                    sp.frozen.get(root, ""),
                    root in sp.residual,
                    sp.blocks.get(root, 1),
                )
                by_root[root] = grp
                self.groups.append(grp)
            grp.members.append(name)
        self._group_of_space = by_root

    def group_of(self, conv: str) -> Group | None:
        """The group whose channels are ``conv``'s output channels (None if not a conv)."""
        space = self._conv_space.get(conv)
        return None if space is None else self._group_of_space.get(self._spaces.find(space))

    def conv_names(self) -> list[str]:
        """Every conv the trace saw, in execution order."""
        return list(self._conv_space)

    def _expand(
        self, layout: Layout, keeps: dict[int, np.ndarray], block: int = 1
    ) -> np.ndarray | None:
        parts, offset, changed = [], 0, False
        for space, n in layout:
            grp = self._group_of_space.get(self._spaces.find(space))
            keep = keeps.get(grp.gid) if grp is not None else None
            if keep is None:
                parts.append(np.arange(offset, offset + n, dtype=np.int64))
            else:
                parts.append(keep.astype(np.int64) + offset)
                changed = True
            offset += n
        if not changed:
            return None
        idx = np.concatenate(parts)
        if block > 1:
            idx = (idx[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
        return idx

    def module_indices(
        self, keeps: dict[int, np.ndarray]
    ) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
        """Per changed module: ``(out_keep, in_keep)`` indices for the weight's dims 0 and 1.

        ``keeps`` maps group id to the sorted channel indices that group keeps.
        """
        out: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        for name, use in self.uses.items():
            o = self._expand(use.out_layout, keeps) if use.out_layout else None
            i = self._expand(use.in_layout, keeps, use.in_block) if use.in_layout else None
            if o is not None or i is not None:
                out[name] = (o, i)
        return out


def build_graph(model: nn.Module, ignore: str | None = None) -> ChannelGraph:
    """Trace ``model`` once and return its :class:`ChannelGraph`.

    Parameters
    ----------
    model : nn.Module
        Any module torch.fx can trace (modules matching ``ignore`` are kept whole).
    ignore : str, optional
        Regex (``re.search``) of module paths to leave alone: their channels are frozen.

    Raises
    ------
    UntraceableModelError
        When fx cannot trace the model; the message names the module.
    """
    return ChannelGraph(model, ignore)
