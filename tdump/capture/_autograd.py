"""Walks over a traced step's autograd graph, back to the traced calls' outputs.

The traced step keeps each module call's output node (its ``grad_fn``) by the call's
output name; these walks start at a tensor's node and stop at those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["summands", "tail_calls"]


#: Autograd nodes a sum's operands pass through to it channel for channel (a dtype
#: cast included: autocast and mixed-dtype additions put one between them).
_SUMS = frozenset({"AddBackward0", "ToCopyBackward0"})


def summands(node: Any, named: Mapping[Any, str], most: int = 64) -> list[str] | None:
    """Names of the module calls whose outputs a tensor adds up, or ``None``.

    The tensor's autograd graph, from its ``grad_fn`` ``node``, is followed back
    through additions (``+``, ``+=``, ``torch.add``) to the nodes ``named`` knows (the
    traced calls' outputs, by their ``grad_fn``); operands without a node of their own
    (constants, inputs without grad) or leaves (a learned bias) add no channels of a
    call. Any other operation on the way (a multiplication, a concatenation) or more
    than ``most`` nodes gives ``None``, as does a sum of fewer than two calls' outputs:
    only a sum ties the channels of two calls together one to one.

    >>> import torch
    >>> a = torch.ones(1, 2, requires_grad=True) * 2
    >>> b = torch.ones(1, 2, requires_grad=True) * 3
    >>> named = {a.grad_fn: "conv2.output_0", b.grad_fn: "down.output_0"}
    >>> summands((a + b + 1.0).grad_fn, named)
    ['conv2.output_0', 'down.output_0']
    >>> print(summands((a * b).grad_fn, named), summands(torch.cat([a, b], 1).grad_fn, named))
    None None
    """
    found: list[str] = []
    todo, seen = [node], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if len(seen) > most:
            return None
        name = named.get(node)
        if name is not None:
            found.append(name)
        elif node.name() in _SUMS:
            todo.extend(fn for fn, _ in reversed(node.next_functions))
        elif not hasattr(node, "variable"):  # AccumulateGrad (a leaf) has one
            return None
    names = list(dict.fromkeys(found))
    return names if len(names) > 1 else None


def tail_calls(nodes: Iterable[Any], named: Mapping[Any, str], most: int = 64) -> list[str]:
    """Names of the module calls whose outputs reach ``nodes`` through no other call.

    ``nodes``: the model outputs' ``grad_fn``. The graph is followed back through any
    operation and stops at the nodes ``named`` knows, so the calls found are those a
    functional tail (``F.interpolate(self.cls(x), ...)``, a reshape, a sum of heads)
    ends the model with. At most ``most`` nodes are visited; what was found by then is
    returned.

    >>> import torch
    >>> head = torch.ones(1, 2, 4, 4, requires_grad=True) * 2
    >>> named = {head.grad_fn: "cls.output_0"}
    >>> out = torch.nn.functional.interpolate(head, scale_factor=2.0)
    >>> tail_calls([out.grad_fn], named)
    ['cls.output_0']
    """
    found: list[str] = []
    todo, seen = list(nodes), set[Any]()
    while todo and len(seen) < most:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = named.get(node)
        if name is not None:
            found.append(name)
        else:
            todo.extend(fn for fn, _ in node.next_functions)
    return list(dict.fromkeys(found))
