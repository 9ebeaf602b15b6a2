"""Which tensors of a model the hook can select: activation modules by type, and a
check that ``include_regex`` matches some tensor name at all.

Examples
--------
>>> from torch import nn
>>> by_type(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()))
(frozenset({'1'}), False)
>>> sorted(by_type(nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2)))[0])
['0', '1']
"""

from __future__ import annotations

import re

from torch import nn

from tdump._format import grad_name, output_name
from tdump._modtypes import (
    is_activation_type,
    is_conv_type,
    is_norm_type,
    is_transposed_conv_type,
    type_name,
)
from tdump.capture._config import HookConfig
from tdump.errors import SelectionError

__all__ = ["Selection", "by_type", "check_selection", "computes_a_tensor", "leaf_modules"]

#: An output of a module call, its gradient or its Taylor term: ``<module>.output_<k>[.grad|.taylor]``.
_OUTPUT = re.compile(r"^(?P<module>.+)\.output_\d+(?:\.grad|\.taylor)?$")


class Selection:
    """Whether ``config`` selects a tensor, asked once per name (the hook asks at every call).

    ``by_type_paths``: the modules whose outputs ``include_activations`` selects in the
    registered model (:func:`by_type`).

    >>> sel = Selection(HookConfig(out="memory://x", include_regex=".*conv.*"))
    >>> sel("conv1.output_0", "activations"), sel.module("conv1"), sel.module("fc")
    (True, True, False)
    """

    def __init__(self, config: HookConfig, by_type_paths: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.by_type_paths = by_type_paths
        self._known: dict[tuple[str, str], bool] = {}

    def __call__(self, name: str, collection: str) -> bool:
        """Whether the tensor ``name`` of ``collection`` is saved."""
        key = (name, collection)
        hit = self._known.get(key)
        if hit is None:
            act = _OUTPUT.match(name) if self.by_type_paths else None
            of_activation = act is not None and act["module"] in self.by_type_paths
            hit = self._known[key] = self.config.selects(
                name, collection, of_activation=of_activation
            )
        return hit

    def add_modules(self, paths: frozenset[str]) -> None:
        """Select the outputs of the modules at ``paths`` as :attr:`by_type_paths`' are."""
        self.by_type_paths |= paths
        self._known.clear()

    def records(self, name: str) -> bool:
        """Whether module output ``name``, its gradient or its Taylor term is saved."""
        return (
            self(name, "activations")
            or self(grad_name(name), "activation_gradients")
            or (
                self.config.reduction == "taylor" and self(name + ".taylor", "activation_gradients")
            )
        )

    def module(self, path: str) -> bool:
        """Whether any output of the module at ``path`` (or its gradient) is saved."""
        return any(self.records(output_name(path, k)) for k in range(4))


def by_type(root: nn.Module) -> tuple[frozenset[str], bool]:
    """Modules whose outputs ``include_activations`` selects; and whether they are convs and norms.

    The activation modules; in a model with convs but no activation module (every
    activation a function such as ``F.relu``), the conv and norm outputs instead:
    ranking scores those as pre-activations (docs/ranking.md).
    """
    types = {p: type_name(type(m)) for p, m in root.named_modules() if p}
    acts = frozenset(p for p, t in types.items() if is_activation_type(t))
    convs = {p for p, t in types.items() if is_conv_type(t) or is_transposed_conv_type(t)}
    if acts or not convs:
        return acts, False
    return frozenset(convs | {p for p, t in types.items() if is_norm_type(t)}), True


def computes_a_tensor(path: str) -> bool:
    """A module inside ``parametrizations`` (``weight_norm``'s): its output is a weight."""
    return "parametrizations" in path.split(".")


def leaf_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules without children (``parametrizations`` aside)."""
    return [
        (p, m)
        for p, m in root.named_modules()
        if p
        and not computes_a_tensor(p)
        and all(n == "parametrizations" for n, _ in m.named_children())
    ]


def check_selection(cfg: HookConfig, root: nn.Module, by_type_selected: bool) -> None:
    """Refuse an ``include_regex`` that matches no tensor name ``root`` can have.

    Skipped when activations are selected by type (``by_type_selected``): those match.
    """
    if cfg.include_regex is None or by_type_selected:
        return
    names = [n for n, _ in root.named_parameters()]
    names += [grad_name(n) for n in names]
    names += [n for n, _ in root.named_buffers()]
    for p, _ in root.named_modules():
        for k in range(4):
            names += [output_name(p, k), grad_name(output_name(p, k))]
    names += ["loss.output_0", "loss.input_0.0", "loss.input_0.1"]
    rx = re.compile(cfg.include_regex)
    if not any(rx.search(n) for n in names):
        example = ", ".join(names[:3])
        raise SelectionError(
            f"include_regex {cfg.include_regex!r} matches no tensor of {type(root).__name__} "
            f"(names look like {example}); see docs/FORMAT.md 'Tensor names'"
        )
