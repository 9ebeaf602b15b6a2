"""The channel dependency graph, built once from a torch.fx trace.

Every tensor in the traced forward gets a *channel layout*: the list of segments its
channel dimension (dim 1) is made of. A segment is ``(space, length)``: ``length``
channels that belong to a *channel space*. A conv creates a new space for its output
channels; channel-wise modules and functions (BatchNorm, ReLU, pooling, dropout)
pass the layout through; ``torch.cat(..., dim=1)`` concatenates layouts (channel
offsets); residual additions merge the spaces they add (union-find), so all convs
summed into one tensor end up in one space: a *group*. A depthwise conv merges its
input and output spaces; a grouped conv's outputs form *blocks* (equal removals per
group) and its inputs are frozen; a GroupNorm's groups and a ``pixel_shuffle``'s runs
of ``r * r`` channels are *units* that go whole. Anything the graph does not understand
(an unknown op, the model output, an ignored module) *freezes* the spaces it touches:
frozen groups are never pruned. No rule names an architecture. The model is traced in eval
and in training mode, and both graphs feed the same spaces, so branches that run only
in training (auxiliary classifiers) are pruned consistently too. A model whose own
forward fx cannot follow (a detection model) is traced in parts (:mod:`tdump.surgery._parts`).

Examples
--------
>>> import torchvision
>>> g = build_graph(torchvision.models.resnet18())
>>> [grp.members for grp in g.groups if len(grp.members) > 1][0][:2]
['conv1', 'layer1.0.conv2']
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import fx, nn

from tdump.errors import ConfigError
from tdump.surgery._functions import FunctionRules
from tdump.surgery._ndim import PAD_MODULES, node_ndim, pad_dims
from tdump.surgery._ops import PASS_MODULES
from tdump.surgery._parts import trace_modes
from tdump.surgery._trace import trace
from tdump.surgery._values import (
    NONTENSOR,
    UNKNOWN,
    ChannelsLast,
    Layout,
    ModuleUse,
    Shuffled,
    Spaces,
    Unshuffled,
    flatten_args,
    is_depthwise,
)
from tdump.surgery._weight_norm import computed_weight

__all__ = ["ChannelGraph", "Group", "ModuleUse", "build_graph", "trace"]


@dataclass
class Group:
    """Coupled output channels: all convs in ``members`` lose the same channel indices.

    ``size`` channels; ``frozen`` (with ``reason``) means the group is left alone;
    ``residual`` says the coupling came through an addition (a residual group);
    ``blocks > 1`` (a grouped conv's outputs) means channels must go in equal numbers
    from each of ``blocks`` contiguous blocks; ``units`` (a GroupNorm's groups: a label
    per channel, ``-1`` for channels that stay) means they go in whole units.
    """

    gid: int
    size: int
    members: list[str]
    frozen: bool = False
    reason: str = ""
    residual: bool = False
    blocks: int = 1
    units: np.ndarray | None = None


class ChannelGraph(FunctionRules):
    """Channel spaces, groups and module uses of one traced model.

    Build it with :func:`build_graph`; query :attr:`groups`, :meth:`group_of` and
    :meth:`module_indices` (which channels each module keeps, given per-group keeps).
    """

    def __init__(
        self,
        model: nn.Module,
        ignore: str | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        try:
            pattern = re.compile(ignore) if ignore else None
        except re.error as exc:
            raise ConfigError(f"ignore is not a valid regex ({exc}): {ignore}") from None
        self.model = model
        self.ignore = ignore
        self.input_shape = tuple(input_shape) if input_shape else None
        self._spaces = Spaces()
        self.uses: dict[str, ModuleUse] = {}
        self._conv_space: dict[str, int] = {}
        self._called: set[str] = set()  # modules called so far in the graph being read
        self._ndims: dict[fx.Node, int | None] = {}  # tensor ranks where the graph fixes them
        self.notes: list[str] = []
        graphs = trace_modes(model, pattern, self.input_shape, self.notes)
        #: the traced parts' path prefixes when the model's own forward could not be traced
        self.parts = sorted({prefix for prefix, _ in graphs if prefix})
        for prefix, graph in graphs:
            self._called = set()
            self._build(graph, pattern, prefix)
        self._finish()

    # ------------------------------------------------------------------ building
    def _build(self, graph: fx.Graph, ignore: re.Pattern[str] | None, prefix: str = "") -> None:
        env: dict[fx.Node, Any] = {}
        modules = dict(self.model.named_modules())
        for node in graph.nodes:  # a part's graph names modules from the part: make them full paths
            if prefix and node.op in ("call_module", "get_attr"):
                node.target = prefix + str(node.target)
        input_ndim = len(self.input_shape) + 1 if self.input_shape and not prefix else None

        def val(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return env[a]
            return NONTENSOR

        for node in graph.nodes:
            op = node.op
            if op == "placeholder":
                env[node] = UNKNOWN
            elif op == "get_attr":
                env[node] = self._get_attr(str(node.target))
            elif op == "output":
                out = f"leaves {prefix[:-1]} for code fx cannot trace" if prefix else ""
                for a in flatten_args(node.args):
                    self._freeze_layout(val(a), out or "reaches the model output")
            elif op == "call_module":
                mod = modules[node.target]
                args = [val(a) for a in flatten_args((node.args, node.kwargs))]
                ignored = ignore is not None and ignore.search(node.target) is not None
                first = node.args[0] if node.args else None
                ndim = self._ndims.get(first) if isinstance(first, fx.Node) else None
                env[node] = self._module(node.target, mod, args, ignored, ndim)
            else:
                env[node] = self._function(node, val)
            ndim = node_ndim(node, modules, self._ndims, input_ndim)
            if ndim is None and op == "call_module" and isinstance(env[node], tuple):
                # a Linear whose output the graph lays out at dim 1 reads (N, C): 2-D
                ndim = 2 if isinstance(modules[node.target], nn.Linear) else None
            self._ndims[node] = ndim

    def _module(
        self, name: str, mod: nn.Module, args: list[Any], ignored: bool, ndim: int | None
    ) -> Any:
        """The channel value of calling ``mod``; ``ndim`` is its input's rank if known."""
        x = args[0] if args else UNKNOWN
        tensors = [a for a in args if a is not NONTENSOR]
        if ignored:
            for a in tensors:
                self._freeze_layout(a, f"ignored module {name}")
            return UNKNOWN
        if name in self.uses:
            return self._reuse(self.uses[name], x)
        if name in self._called and not isinstance(mod, PASS_MODULES):
            for a in tensors:  # called before on channels that could not change
                self._freeze_layout(a, f"{name} is called on channels that cannot change")
            return UNKNOWN
        self._called.add(name)
        if computed_weight(mod):
            for a in tensors:
                self._freeze_layout(
                    a,
                    f"{name} computes its weight (spectral_norm, a parametrization), which "
                    "pruning would change: remove that to prune it (torch.nn.utils."
                    "parametrize.remove_parametrizations; weight_norm prunes as it is)",
                )
            return UNKNOWN
        sp = self._spaces
        if isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(
            mod, nn.modules.conv._ConvTransposeNd
        ):
            unit = 1  # layout channels per input channel: a run, after a pixel_shuffle
            block = 1  # input channels per layout channel, after a pixel_unshuffle
            if isinstance(x, Shuffled) and mod.groups == 1:
                unit, x = x.factor, x.layout
            elif isinstance(x, Unshuffled) and mod.groups == 1:
                block, x = x.factor, x.layout
            layout = self._conv_input(name, mod, x, "a flattened tensor", unit, block)
            if is_depthwise(mod) and layout is not None:
                return self._follows_input(name, mod, layout)
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
                if is_depthwise(mod):
                    sp.freeze(space, f"depthwise conv {name} over channels that cannot change")
                else:
                    sp.blocks[space] = int(mod.groups)
                self._freeze_layout(layout, f"grouped conv {name} (groups={mod.groups}) reads them")
                layout = None
            out: Layout = ((space, int(mod.out_channels)),)
            self.uses[name] = ModuleUse(
                name, "conv", mod, out, layout, block, out_value=out, in_unit=unit
            )
            return out
        if isinstance(mod, nn.modules.conv._ConvTransposeNd) and mod.groups == 1:
            return self._transposed(name, mod, x)
        if isinstance(mod, nn.modules.conv._ConvTransposeNd) and is_depthwise(mod):
            return self._depthwise_transposed(name, mod, x)
        if isinstance(
            mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
        ):
            # per-channel statistics and affine either way: instance norm is per example too
            return self._per_channel(name, mod, x, "bn", int(mod.num_features))
        if isinstance(mod, nn.GroupNorm):
            return self._group_norm(name, mod, x)
        if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
            return self._per_channel(name, mod, x, "prelu", mod.num_parameters)  # a slope each
        if isinstance(mod, nn.PReLU):
            return x  # one slope for all channels
        if isinstance(mod, nn.Linear):
            # a Linear reads the last axis: a 2-D (N, C) tensor, a flattened map, or a
            # channels-last tensor; its out features are a new space, laid out the same way
            layout, block = None, 0
            if isinstance(x, (tuple, ChannelsLast)) or (isinstance(x, list) and x):
                layout = (
                    x.layout if isinstance(x, ChannelsLast) else x if isinstance(x, tuple) else x[0]
                )
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
            value = ChannelsLast(lay) if isinstance(x, ChannelsLast) else lay
            self.uses[name] = ModuleUse(name, "linear", mod, lay, layout, max(block, 1), 0, value)
            return value
        if isinstance(mod, nn.LayerNorm):
            shape = tuple(mod.normalized_shape)
            if isinstance(x, ChannelsLast) and shape == (sum(n for _, n in x.layout),):
                self.uses[name] = ModuleUse(name, "ln", mod, x.layout, out_value=x)
                return x
        if isinstance(mod, nn.PixelShuffle):
            return self._pixel_shuffle(name, x, int(mod.upscale_factor))
        if isinstance(mod, nn.PixelUnshuffle) and isinstance(x, tuple):
            return self._pixel_unshuffle(x, int(mod.downscale_factor))
        if isinstance(mod, nn.Flatten):
            if isinstance(x, tuple) and mod.start_dim == 1:
                return [x]
            self._freeze_layout(x, f"flatten {name}")
            return UNKNOWN
        if isinstance(mod, PASS_MODULES):
            return x
        if isinstance(mod, PAD_MODULES) and isinstance(x, tuple):
            padded = pad_dims(mod.padding)
            if padded is not None and ndim is not None and ndim - padded >= 2:
                return x  # pads only dimensions after the channels
        for a in tensors:
            self._freeze_layout(a, f"unsupported module {name} ({type(mod).__name__})")
        return UNKNOWN

    def _per_channel(self, name: str, mod: nn.Module, x: Any, kind: str, count: int) -> Any:
        """A module with ``count`` values per channel of dim 1: sliced with the channels."""
        if isinstance(x, tuple) and sum(n for _, n in x) == count:
            self.uses[name] = ModuleUse(name, kind, mod, x, out_value=x)
            return x
        self._freeze_layout(x, f"{name} does not match its input")
        return UNKNOWN

    def _conv_input(
        self, name: str, mod: nn.Module, x: Any, unknown: str, unit: int = 1, block: int = 1
    ) -> Layout | None:
        """The layout a conv's ``in_channels`` follow (``unit`` channels each, or
        ``block`` input channels per channel), or None (then its inputs are frozen)."""
        if not isinstance(x, tuple):
            self._freeze_layout(x, f"{name} reads {unknown}")
            return None
        if sum(n for _, n in x) * block != mod.in_channels * unit:  # type: ignore[operator]
            self._freeze_layout(x, f"{name} in_channels do not match its input")
            return None
        return x

    def _transposed(self, name: str, mod: nn.Module, x: Any) -> Layout:
        """A transposed conv (a decoder's upsampling): like a conv, its weight ``(in, out, ...)``."""
        layout = self._conv_input(name, mod, x, "a tensor of unknown channels")
        space = self._spaces.new(int(mod.out_channels))  # type: ignore[arg-type]
        self._conv_space[name] = space
        out: Layout = ((space, int(mod.out_channels)),)  # type: ignore[arg-type]
        self.uses[name] = ModuleUse(name, "transposed", mod, out, layout, out_value=out)
        return out

    def _depthwise_transposed(self, name: str, mod: nn.Module, x: Any) -> Layout:
        """A depthwise transposed conv (``groups == in == out``: a learned per-channel
        upsampling, as in CenterNet's IDA-up): like a depthwise conv, its channels follow
        its input's; its weight ``(C, 1, ...)`` loses the same rows."""
        layout = self._conv_input(name, mod, x, "a tensor of unknown channels")
        if layout is None:
            space = self._spaces.new(int(mod.out_channels))  # type: ignore[arg-type]
            self._spaces.freeze(space, f"depthwise conv {name} over channels that cannot change")
            self._conv_space[name] = space
            return ((space, int(mod.out_channels)),)  # type: ignore[arg-type]
        return self._follows_input(name, mod, layout)

    def _follows_input(self, name: str, mod: nn.Module, layout: Layout) -> Layout:
        """A depthwise conv (or transposed conv): its channels are its input's."""
        self.uses[name] = ModuleUse(name, "depthwise", mod, layout, layout, out_value=layout)
        if len(layout) == 1:
            self._conv_space[name] = layout[0][0]
        return layout

    def _group_norm(self, name: str, mod: nn.GroupNorm, x: Any) -> Any:
        """A GroupNorm normalises runs of ``num_channels / num_groups`` channels together:
        removing a whole run leaves the others' statistics as they were, removing part of
        one does not. So each space it reads loses channels in whole runs; a run that
        spans two spaces (a concatenation the group size does not divide) keeps its
        channels in both.
        """
        if not (isinstance(x, tuple) and sum(n for _, n in x) == mod.num_channels):
            self._freeze_layout(x, f"{name} does not match its input")
            return UNKNOWN
        chunk = mod.num_channels // mod.num_groups
        offset, parts, spanning = 0, [], 0
        for space, n in x:
            run = (offset + np.arange(n)) // chunk
            inside = (run * chunk >= offset) & ((run + 1) * chunk <= offset + n)
            parts.append((space, n, np.where(inside, run - run[0], -1)))
            spanning += int((~inside).sum())
            offset += n
        if spanning:
            sizes = " + ".join(str(n) for _, n in x)
            note = (
                f"{name}'s groups of {chunk} span channels of different layers ({sizes}): "
                f"the {spanning} channels in those groups stay (a num_groups whose group "
                "size divides each part frees them)"
            )
            if note not in self.notes:  # both modes' graphs call it
                self.notes.append(note)
        for space, n, labels in parts:
            if n == chunk and bool((labels >= 0).all()):
                what = "one group" if mod.num_groups == 1 else f"groups of {chunk}"
                self._spaces.freeze(
                    space, f"{name} normalises them as {what}: any removal changes the rest"
                )
            self._spaces.constrain_units(space, labels, name)
        self.uses[name] = ModuleUse(name, "gn", mod, x, out_value=x)
        return x

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
        if root in sp.units:  # a GroupNorm came first: the units' check against blocks
            sp.constrain_units(root, sp.units.pop(root), name)
        self.uses[name] = ModuleUse(name, "grouped", mod, layout, layout, out_value=layout)
        self._conv_space[name] = space
        return layout

    def _reuse(self, use: ModuleUse, x: Any) -> Any:
        """A module called again (shared weights): both calls' channels must go together."""
        seen = use.out_layout if use.kind in ("bn", "gn", "ln", "prelu") else use.in_layout
        new = x[0] if use.kind == "linear" and isinstance(x, list) and x else x
        if isinstance(new, ChannelsLast) and use.kind in ("linear", "ln"):
            new = new.layout
        if (isinstance(new, Shuffled) and new.factor == use.in_unit) or (
            isinstance(new, Unshuffled) and new.factor == use.in_block
        ):
            new = new.layout
        if (
            seen is not None
            and isinstance(new, tuple)
            and [n for _, n in new] == [n for _, n in seen]
        ):
            self._merge([seen, new], residual=False)
        elif seen is None and use.kind in ("conv", "transposed", "linear"):
            # its inputs were frozen at the first call (grouped conv, flattened input):
            # so are this call's; its outputs are still its own
            self._freeze_layout(new, f"{use.name} reads them (inputs left alone)")
        else:
            reason = f"{use.name} is called on differently laid out inputs"
            for lay in (seen, new, use.out_layout):
                self._freeze_layout(lay, reason)
        return use.out_value

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
                    sp.units.get(root),
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
        self, layout: Layout, keeps: dict[int, np.ndarray], block: int = 1, unit: int = 1
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
        if unit > 1:  # whole runs are kept (units): one index per run
            idx = idx.reshape(-1, unit)[:, 0] // unit
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
            i = (
                self._expand(use.in_layout, keeps, use.in_block, use.in_unit)
                if use.in_layout
                else None
            )
            if o is not None or i is not None:
                out[name] = (o, i)
        return out


def build_graph(
    model: nn.Module, ignore: str | None = None, input_shape: Sequence[int] | None = None
) -> ChannelGraph:
    """Trace ``model`` once and return its :class:`ChannelGraph`.

    Parameters
    ----------
    model : nn.Module
        Any module torch.fx can trace (modules matching ``ignore`` are kept whole).
    ignore : str, optional
        Regex (``re.search``) of module paths to leave alone: their channels are frozen.
    input_shape : sequence of int, optional
        The model's input shape, batch excluded: a forward that branches on shapes
        (``if x.dim() == 3:``) is traced at that shape (a note in :attr:`ChannelGraph.notes`).

    Raises
    ------
    UntraceableModelError
        When fx cannot trace the model; the message names the module.
    """
    return ChannelGraph(model, ignore, input_shape)
