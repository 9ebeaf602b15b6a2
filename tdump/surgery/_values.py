"""Channel layouts, value markers and channel spaces (union-find) of the channel graph.

A tensor's value in the graph is a *layout* (a tuple of ``(space, length)``
segments: its channels at dim 1), a flattened layout (``[layout]``), a
:class:`ChannelsLast` layout, a :class:`Shuffled` layout (after a ``pixel_shuffle``), an :class:`Unshuffled` one (after a
``pixel_unshuffle``), a :class:`Param` (a tensor attribute read directly), or
one of the markers ``UNKNOWN`` / ``NONTENSOR``.

Examples
--------
>>> sp = Spaces()
>>> a, b = sp.new(4), sp.new(4)
>>> sp.union(a, b, residual=True); sp.find(b) == a
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from tdump.surgery._units import merge_units

__all__ = [
    "NONTENSOR",
    "UNKNOWN",
    "ChannelsLast",
    "Layout",
    "ModuleUse",
    "Param",
    "Shuffled",
    "Spaces",
    "Unshuffled",
    "flatten_args",
    "is_depthwise",
]

Layout = tuple[tuple[int, int], ...]  # ((space, length), ...)
UNKNOWN = "unknown"  # a tensor whose channel layout we do not know
NONTENSOR = "nontensor"  # a value that is not a channel-carrying tensor (sizes, dtypes)


@dataclass
class ModuleUse:
    """How one module's tensors map to channel spaces.

    ``kind`` is ``"conv"``, ``"depthwise"``, ``"grouped"`` (in == out channels, one
    space), ``"transposed"`` (a transposed conv, groups 1: its weight is
    ``(in, out, ...)``, the layouts still name its output and input channels), ``"bn"``,
    ``"gn"`` (a GroupNorm: its channels go in whole groups), ``"prelu"`` (a PReLU with a
    slope per channel), ``"ln"`` (LayerNorm over the
    channels), ``"linear"`` or ``"param"`` (a tensor attribute read directly, e.g. a
    per-channel scale; ``name`` is its qualified name, sliced along ``axis``).
    ``out_layout`` is the layout of the dim-0 axis of the weight (conv out channels, BN
    and LN features, linear out features); ``in_layout`` that of the weight's dim 1
    (conv in channels, linear in features, expanded by ``in_block`` features per
    channel after a flatten; ``in_unit`` of its channels make one input channel of a
    conv after a ``pixel_shuffle``; a conv after a ``pixel_unshuffle`` has ``in_block``
    channels per channel of ``in_layout``). ``out_value`` is what a call returns (for
    repeated calls).
    """

    name: str
    kind: str
    module: nn.Module
    out_layout: Layout | None = None
    in_layout: Layout | None = None
    in_block: int = 1
    axis: int = 0
    out_value: Any = None
    in_unit: int = 1  # in_layout channels per weight input channel (after a pixel_shuffle)


@dataclass(frozen=True)
class ChannelsLast:
    """A tensor whose channels are its **last** axis (channels-last), e.g. after a permute."""

    layout: Layout


@dataclass(frozen=True)
class Shuffled:
    """A ``pixel_shuffle`` output: its channel ``c`` is made of channels ``c * factor`` to
    ``(c + 1) * factor - 1`` of ``layout`` (``factor`` is the upscale factor squared)."""

    layout: Layout
    factor: int


@dataclass(frozen=True)
class Unshuffled:
    """A ``pixel_unshuffle`` output: channel ``c`` of ``layout`` became channels
    ``c * factor`` to ``(c + 1) * factor - 1`` (``factor`` is the downscale factor squared)."""

    layout: Layout
    factor: int


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read directly (``get_attr``): its qualified name and shape."""

    name: str
    shape: tuple[int, ...]


@dataclass
class Spaces:
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)
    residual: set[int] = field(default_factory=set)
    blocks: dict[int, int] = field(default_factory=dict)  # root -> equal blocks (grouped convs)
    #: root -> a label per channel: channels that go together (GroupNorm groups), -1 pinned
    units: dict[int, np.ndarray] = field(default_factory=dict)

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
        theirs = self.units.pop(rb, None)
        if theirs is not None:
            self.constrain_units(ra, theirs, "")
        elif ra in self.units:
            self.constrain_units(ra, self.units.pop(ra), "")  # checks it against blocks
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if residual or rb in self.residual:
            self.residual.add(ra)
        self.residual.discard(rb)

    def constrain_units(self, s: int, labels: np.ndarray, who: str) -> None:
        """Channels of ``s`` go only in the units ``labels`` gives (GroupNorm groups,
        the blocks a ``pixel_shuffle`` turns into one channel).

        Units of two GroupNorms combine (:func:`~tdump.surgery._units.merge_units`); a
        grouped conv's blocks (one channel from every block at a time) cannot also keep
        units whole: frozen; so is a space whose every channel is pinned.
        """
        root = self.find(s)
        old = self.units.get(root)
        merged = merge_units(labels, labels) if old is None else merge_units(old, labels)
        self.units[root] = merged
        by = f" ({who})" if who else ""
        if self.blocks.get(root, 1) > 1:
            self.freeze(
                root, f"a grouped conv and a GroupNorm or pixel_shuffle share these channels{by}"
            )
        elif bool((merged < 0).all()):
            self.freeze(
                root, f"GroupNorm groups that span other layers' channels hold them all{by}"
            )


def flatten_args(args: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(args, (list, tuple)):
        for a in args:
            out.extend(flatten_args(a))
    elif isinstance(args, dict):
        for a in args.values():
            out.extend(flatten_args(a))
    else:
        out.append(args)
    return out


def is_depthwise(conv: nn.Module) -> bool:
    groups = int(conv.groups)  # type: ignore[arg-type]
    return groups > 1 and groups == conv.in_channels == conv.out_channels
