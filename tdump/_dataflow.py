"""Map activations to the layer (conv, or hidden Linear) whose output channels they carry.

The store's rank-group attributes hold the module tree (``modules``) and the
dataflow of one forward pass (``calls``, see ``docs/FORMAT.md``). Starting at a
module call's output we follow the first tensor input back through modules that
keep channels one-to-one (BatchNorm, activations, dropout, pooling, identity) until
a convolution, or a hidden Linear, is reached: one whose output feeds another layer,
either 2-D (an MLP head, whose features are channels on axis 1 like a conv's) or
**channels-last** (``(batch, tokens, features)``: ViT's, Swin's and ConvNeXt's MLPs,
whose features are the last axis; only element-wise modules keep those one-to-one).
Names are never parsed for structure. Ranking reads a store's dataflow; capture
builds one from its first traced train step, to pick the pre-activations no
activation module carries (:meth:`Dataflow.unreached`).

Examples
--------
>>> calls = [
...     {"name": "conv1.output_0", "module": "conv1", "call": 0, "inputs": ["<input>"]},
...     {"name": "bn1.output_0", "module": "bn1", "call": 0, "inputs": ["conv1.output_0"]},
...     {"name": "relu.output_0", "module": "relu", "call": 0, "inputs": ["bn1.output_0"]},
... ]
>>> modules = {
...     "conv1": {"type": "torch.nn.modules.conv.Conv2d", "config": {"out_channels": 8}},
...     "bn1": {"type": "torch.nn.modules.batchnorm.BatchNorm2d"},
...     "relu": {"type": "torch.nn.modules.activation.ReLU"},
... }
>>> g = Dataflow(modules, calls)
>>> g.producing_conv("relu.output_0")
'conv1'
>>> g.following_bn("conv1")
'bn1'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tdump._modtypes import (
    is_activation_type,
    is_bn_type,
    is_conv_type,
    is_elementwise_type,
    is_linear_type,
    is_pixel_shuffle_type,
    is_transposed_conv_type,
)
from tdump._modtypes import is_channel_preserving as _channel_preserving

__all__ = ["Dataflow", "is_activation_type", "is_bn_type", "is_conv_type"]


@dataclass
class Dataflow:
    """The module tree and call graph of one forward pass, as recorded in a store.

    Parameters
    ----------
    modules
        The rank group's ``modules`` attribute: ``{path: {"type": ..., "params": ..., "config": ...}}``.
    calls
        One mode's list from the ``calls`` attribute (execution order).
    returned
        The same mode's ``model_outputs``: the calls whose outputs the model returns
        as they are (empty for dumps written before it was recorded).
    """

    modules: Mapping[str, Mapping[str, Any]]
    calls: Sequence[Mapping[str, Any]]
    returned: frozenset[str] = frozenset()
    _by_name: dict[str, Mapping[str, Any]] = field(init=False, repr=False)
    _consumers: dict[str, list[Mapping[str, Any]]] = field(init=False, repr=False)
    _output_layers: frozenset[str] = field(init=False, repr=False)
    _empty: frozenset[str] = field(init=False, repr=False)
    _chains: dict[str, tuple[str, ...] | None] = field(init=False, repr=False)
    _conv: dict[str, bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # an empty nn.Sequential (a tutorial ResNet's identity shortcut) returns its input
        parents = {p.rsplit(".", 1)[0] if "." in p else "" for p in self.modules if p}
        self._empty = frozenset(
            p
            for p, info in self.modules.items()
            if p not in parents and str(info.get("type", "")).endswith(".Sequential")
        )
        self._chains, self._conv = {}, {}
        self._by_name = {str(c["name"]): c for c in self.calls}
        self._consumers = {}
        for c in self.calls:
            for src in c.get("inputs") or ():
                if src is not None:
                    self._consumers.setdefault(str(src), []).append(c)
        found = (self.producing_conv(name) for name in self.returned)
        self._output_layers = frozenset(layer for layer in found if layer is not None)

    def module_type(self, path: str) -> str:
        """Qualified class name of module ``path`` (``""`` if unknown)."""
        return str((self.modules.get(path) or {}).get("type", ""))

    def is_conv(self, path: str) -> bool:
        """True for a conv whose output channels rank: any conv, or a transposed one of
        groups 1 or a depthwise one (``groups == in == out``; the others keep theirs)."""
        known = self._conv.get(path)
        if known is None:
            known = self._conv[path] = self._is_conv(path)
        return known

    def _is_conv(self, path: str) -> bool:
        typ = self.module_type(path)
        if is_transposed_conv_type(typ):
            cfg = self.modules[path].get("config") or {}
            groups = int(cfg.get("groups", 1))
            return groups == 1 or groups == cfg.get("in_channels") == cfg.get("out_channels")
        return is_conv_type(typ)

    def is_transposed(self, path: str) -> bool:
        """True for a transposed conv: its weight is ``(in, out / groups, *kernel)``."""
        return is_transposed_conv_type(self.module_type(path))

    def filter_axis(self, path: str) -> int:
        """The weight axis of ``path``'s output channels: 1 for a transposed conv of
        groups 1, else 0 (a depthwise transposed conv's weight is ``(C, 1, ...)``)."""
        if not self.is_transposed(path):
            return 0
        cfg = (self.modules.get(path) or {}).get("config") or {}
        return 1 if int(cfg.get("groups", 1)) == 1 else 0

    def convs(self) -> list[str]:
        """Conv module paths in execution order (first call), then any never called."""
        seen: dict[str, None] = {}
        for c in self.calls:
            mod = str(c["module"])
            if self.is_conv(mod):
                seen.setdefault(mod, None)
        for path in self.modules:
            if self.is_conv(path):
                seen.setdefault(path, None)
        return list(seen)

    def layers(self) -> list[str]:
        """The layers whose output channels rank: :meth:`convs`, then the hidden Linears.

        A hidden Linear (:meth:`is_hidden_linear`) is listed in execution order after
        the convs, so that a conv model's layers read as before.
        """
        linears = {str(c["module"]): None for c in self.calls if self.is_hidden_linear(c)}
        return self.convs() + list(linears)

    def is_linear(self, path: str) -> bool:
        """True if module ``path`` is a Linear (ranked as a layer when :meth:`is_hidden_linear`)."""
        return is_linear_type(self.module_type(path))

    def is_hidden_linear(self, call: Mapping[str, Any]) -> bool:
        """True for a call of a Linear whose output feeds another layer.

        A 2-D ``(batch, features)`` output has its features on axis 1, as a conv's
        channels; a channels-last one (ViT's MLP, ``(batch, tokens, features)``) on its
        last axis (:meth:`channels_last`). The model's last Linear is not hidden (its
        outputs are the classes, even when a ``Softmax`` module follows): only module
        calls that lead to another conv or Linear make it hidden.
        """
        if not is_linear_type(self.module_type(str(call["module"]))) or _ndim(call) < 2:
            return False
        todo, seen = [str(call["name"])], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for consumer in self._consumers.get(name, []):
                mod = str(consumer["module"])
                if self.is_conv(mod) or self.is_linear(mod):
                    return True
                todo.append(str(consumer["name"]))
        return False

    def channels_last(self, layer: str) -> bool:
        """True if Linear ``layer``'s recorded output has 3+ dims: its features are the last axis.

        Its stored outputs (and their gradients) are ``(batch, ..., features)``; the
        ranking moves that axis to 1 before a criterion reads them.
        """
        if not self.is_linear(layer):
            return False
        return any(str(c["module"]) == layer and _ndim(c) >= 3 for c in self.calls)

    def out_channels(self, conv: str) -> int | None:
        """``out_channels`` of ``conv`` from its recorded config or weight shape."""
        info = self.modules.get(conv) or {}
        cfg = info.get("config") or {}
        if "out_channels" in cfg:
            return int(cfg["out_channels"])
        shape = (info.get("params") or {}).get("weight")
        if shape and self.is_transposed(conv):
            return int(shape[1]) * int(cfg.get("groups", 1))
        return int(shape[0]) if shape else None

    def chain(self, output: str) -> list[str] | None:
        """Module paths from ``output``'s module back to the producing layer (inclusive).

        The producing layer is a conv, or a hidden Linear (:meth:`is_hidden_linear`).
        ``None`` when the chain leaves channel-preserving modules before one (the
        model's last Linear, a concatenation, the model input, a non-module operation,
        a BatchNorm or pooling after a channels-last Linear). A residual ``+`` (a call's
        ``sum_of``) is followed into its :meth:`_fresh_summand`, as an in-place
        ``out += identity`` is: ``act(bn2(x) + shortcut(x))`` carries ``conv2``'s channels.
        """
        if output not in self._chains:  # asked per call, and again through every sum
            found = self._walk(output)
            self._chains[output] = tuple(found) if found is not None else None
        cached = self._chains[output]
        return list(cached) if cached is not None else None

    def _walk(self, output: str) -> list[str] | None:
        """:meth:`chain`, computed."""
        path: list[str] = []
        name: str | None = output
        for _ in range(len(self._by_name) + 1):
            call = self._by_name.get(name) if name is not None else None
            if call is None:
                return None
            mod = str(call["module"])
            typ = self.module_type(mod)
            path.append(mod)
            if self.is_conv(mod) or self.is_hidden_linear(call):
                # channels-last features: BatchNorm and pooling mix them (dim 1 is tokens)
                last = _ndim(call) >= 3 and is_linear_type(typ)
                if last and not all(is_elementwise_type(self.module_type(m)) for m in path[:-1]):
                    return None
                return path
            if not (
                _channel_preserving(typ) or self._shuffle_factor(mod) > 1 or mod in self._empty
            ):
                return None
            inputs = call.get("inputs") or []
            name = str(inputs[0]) if inputs and inputs[0] is not None else self._fresh_summand(call)
        return None

    def _fresh_summand(self, call: Mapping[str, Any]) -> str | None:
        """The first output a call's residual ``+`` adds (``sum_of``) whose chain reaches a
        layer through no activation module, else ``None``.

        In ``act(bn2(x) + x)`` that is ``bn2``'s: ``x``, another block's activation,
        already scores the layer its chain reaches, so ``act``'s output scores ``conv2``,
        exactly as after torchvision's ``out += identity``. The other layers of the sum
        share these channels and are pruned with it (:meth:`summed_with`).
        """
        for summand in call.get("sum_of") or ():
            path = self.chain(str(summand))
            if path and not any(is_activation_type(self.module_type(m)) for m in path):
                return str(summand)
        return None

    def _shuffle_factor(self, path: str) -> int:
        """``upscale_factor ** 2`` of a recorded ``PixelShuffle`` module, else 0."""
        if not is_pixel_shuffle_type(self.module_type(path)):
            return 0
        upscale = (self.modules[path].get("config") or {}).get("upscale_factor")
        return int(upscale) ** 2 if isinstance(upscale, int) and upscale > 0 else 0

    def channel_factor(self, output: str) -> int:
        """How many channels of its producing layer make one channel of ``output``: the
        ``upscale_factor ** 2`` of each ``PixelShuffle`` on :meth:`chain`, multiplied (1
        without one). Channel ``c`` of ``output`` is then channels ``c * factor`` to
        ``(c + 1) * factor - 1`` of the layer."""
        factor = 1
        for mod in (self.chain(output) or [])[:-1]:
            factor *= max(self._shuffle_factor(mod), 1)
        return factor

    def is_model_output(self, layer: str) -> bool:
        """True if ``layer``'s output channels are the model's own outputs.

        A call the model returns as it is (:attr:`returned`) carries ``layer``'s
        channels one to one (:meth:`chain`): a segmentation head's classes, a
        super-resolution net's conv before its ``PixelShuffle``. No pruning changes
        them, so they need no score.

        >>> calls = [{"name": "cls.output_0", "module": "cls", "call": 0, "inputs": ["<input>"]}]
        >>> mods = {"cls": {"type": "torch.nn.Conv2d"}}
        >>> Dataflow(mods, calls, frozenset({"cls.output_0"})).is_model_output("cls")
        True
        >>> Dataflow(mods, calls).is_model_output("cls")  # a dump without model_outputs
        False
        """
        return layer in self._output_layers

    def summed_with(self, layer: str) -> list[str]:
        """The layers whose output channels recorded sums add to ``layer``'s, nearest first.

        A call's ``sum_of`` (capture traces its input back through ``+``) names the
        outputs a residual addition adds up; the layers those carry (:meth:`chain`) share
        their channels one to one, and so, through the next sum, with the layers beyond.
        Empty for dumps without ``sum_of`` (written before it was recorded, or eval).

        >>> calls = [
        ...     {"name": "a.output_0", "module": "a", "call": 0, "inputs": ["<input>"]},
        ...     {"name": "b.output_0", "module": "b", "call": 0, "inputs": ["<input>"]},
        ...     {"name": "c.output_0", "module": "c", "call": 0, "inputs": ["a.output_0"],
        ...      "sum_of": ["a.output_0", "b.output_0"]},
        ...     {"name": "e.output_0", "module": "e", "call": 0, "inputs": ["c.output_0"]},
        ...     {"name": "f.output_0", "module": "f", "call": 0, "inputs": ["c.output_0"],
        ...      "sum_of": ["c.output_0", "e.output_0"]},
        ... ]   # relu c carries a's channels (``a += b`` in place), then e's are added to them
        >>> conv, relu = {"type": "torch.nn.Conv2d"}, {"type": "torch.nn.ReLU"}
        >>> flow = Dataflow({"a": conv, "b": conv, "c": relu, "e": conv, "f": relu}, calls)
        >>> flow.summed_with("b"), flow.summed_with("e")
        (['a', 'e'], ['a', 'b'])
        """
        found: dict[str, None] = {}
        todo = [layer]
        while todo:
            cur = todo.pop(0)
            for group in self._sum_groups:
                if cur in group:
                    new = sorted(group - found.keys() - {layer})
                    found.update(dict.fromkeys(new))
                    todo += new
        return list(found)

    @functools.cached_property
    def _sum_groups(self) -> list[frozenset[str]]:
        """The layers each recorded sum adds up (built once: rank asks per unscored layer)."""
        return [
            frozenset(c for c in map(self.producing_conv, call["sum_of"]) if c is not None)
            for call in self.calls
            if call.get("sum_of")
        ]

    def producing_conv(self, output: str) -> str | None:
        """Layer (conv, or hidden Linear) whose output channels ``output`` (``<module>.output_<k>``)
        carries, or ``None``."""
        chain = self.chain(output)
        return chain[-1] if chain else None

    def following_bn(self, conv: str) -> str | None:
        """The BatchNorm module whose call consumes ``conv``'s output, or ``None``.

        Never one after a channels-last Linear: a BatchNorm's channels are dim 1.
        """
        if self.channels_last(conv):
            return None
        for c in self.calls:
            if str(c["module"]) != conv:
                continue
            for consumer in self._consumers.get(str(c["name"]), []):
                mod = str(consumer["module"])
                if is_bn_type(self.module_type(mod)):
                    return mod
        return None

    def modules_read_by(self, accepts: Callable[[str], bool]) -> set[str]:
        """Modules whose output a call of a module whose type ``accepts`` reads."""
        out: set[str] = set()
        for c in self.calls:
            if not accepts(self.module_type(str(c["module"]))):
                continue
            for src in c.get("inputs") or ():
                producer = self._by_name.get(str(src)) if src is not None else None
                if producer is not None:
                    out.add(str(producer["module"]))
        return out

    def output_type(self, output: str) -> str:
        """Qualified class name of the module whose call produced ``output`` (``""`` if unknown)."""
        call = self._by_name.get(output)
        return self.module_type(str(call["module"])) if call is not None else ""

    def is_activation_output(self, output: str) -> bool:
        """True if ``output`` is the output of an element-wise activation module call."""
        return is_activation_type(self.output_type(output))

    def unreached(self, recorded: Collection[str]) -> dict[str, str]:
        """``{layer: module}``: the layers no ``recorded`` output carries, and the module
        whose output carries each of them furthest (its pre-activation).

        Left out: the layers whose channels are the model's outputs
        (:meth:`is_model_output`), and those a recorded sum adds to a carried layer's
        (:meth:`summed_with`): the surgery prunes them with it. What is left, a U-Net's
        up-convs (concatenated with a skip before any activation) or a MobileNet's
        projection convs, has no score unless its own output is recorded.

        >>> calls = [
        ...     {"name": "up.output_0", "module": "up", "call": 0, "inputs": ["<input>"]},
        ...     {"name": "bn.output_0", "module": "bn", "call": 0, "inputs": ["up.output_0"]},
        ...     {"name": "c.output_0", "module": "c", "call": 0, "inputs": [None]},
        ...     {"name": "r.output_0", "module": "r", "call": 0, "inputs": ["c.output_0"]},
        ...     {"name": "h.output_0", "module": "h", "call": 0, "inputs": ["r.output_0"]},
        ... ]   # up -> bn -> torch.cat -> conv c -> relu r -> head h
        >>> mods = {"up": {"type": "torch.nn.ConvTranspose2d"}, "bn": {"type": "torch.nn.BatchNorm2d"},
        ...         "c": {"type": "torch.nn.Conv2d"}, "r": {"type": "torch.nn.ReLU"},
        ...         "h": {"type": "torch.nn.Conv2d"}}
        >>> Dataflow(mods, calls, frozenset({"h.output_0"})).unreached({"r.output_0"})
        {'up': 'bn'}
        """
        carried = {self.producing_conv(name) for name in recorded}
        best: dict[str, tuple[int, str]] = {}
        for call in self.calls:
            chain = self.chain(str(call["name"]))
            if chain and chain[-1] not in carried and len(chain) > best.get(chain[-1], (0, ""))[0]:
                best[chain[-1]] = (len(chain), str(call["module"]))
        return {
            layer: module
            for layer, (_, module) in best.items()
            if not self.is_model_output(layer) and not carried.intersection(self.summed_with(layer))
        }

    def outputs_by_conv(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Group module-output tensor ``names`` by producing conv.

        Returns ``{conv: [name, ...]}`` with activation outputs first (the ReLU after
        conv -> bn), then by longest chain, then by name.
        """
        found: dict[str, list[tuple[int, int, str]]] = {}
        for name in names:
            chain = self.chain(name)
            if chain:
                rank = 0 if self.is_activation_output(name) else 1
                found.setdefault(chain[-1], []).append((rank, -len(chain), name))
        return {conv: [t[2] for t in sorted(items)] for conv, items in found.items()}


def _ndim(call: Mapping[str, Any]) -> int:
    """The number of dims of a recorded call's output (its ``shape``; 0 when not recorded)."""
    shape = call.get("shape")
    return len(shape) if isinstance(shape, (list, tuple)) else 0
