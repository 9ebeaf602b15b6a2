"""Tracing, in parts, a model whose own ``forward`` torch.fx cannot follow (detection models).

A detection model's ``forward`` takes a list of images and branches on the targets, so
no trace of the whole model exists, and no ``--ignore`` can help: the failing code is the
root's own. Its parts still have channels to prune: the backbone and its FPN, the box
head's hidden features. When the root cannot be traced, :func:`trace_parts` traces
its children one by one, and a child that cannot be traced either is split the same way.

A child is a part only if the parent's own code (every method of its class and its
bases but ``__init__``) uses it solely by calling it, ``self.backbone(x)``: then
everything that reads its channels inside is in its trace. A child the code reads
otherwise (``self.transform.postprocess(...)``, ``self.module_list[i]``, ``for m in
self.blocks``), or a parent whose code hands ``self`` on or reads its attributes by name
(``getattr(self, ...)``), is left alone whole. A part's inputs and outputs are frozen
(code tdump cannot see reads them); its inner channels prune as in any traced model.

Examples
--------
>>> from torchvision.models.detection import FasterRCNN
>>> sorted(_only_called(FasterRCNN) & {"transform", "backbone", "rpn", "roi_heads"})
['backbone', 'roi_heads', 'rpn']

(``transform`` is left alone: ``self.transform.postprocess(...)`` reads it otherwise.)
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Sequence

from torch import fx, nn

from tdump._modtypes import layer_base
from tdump.errors import UntraceableModelError, listed
from tdump.surgery._trace import trace

__all__ = ["trace_modes", "trace_parts"]

#: Calls that take ``self`` without reading its modules.
_SELF_OK = frozenset({"isinstance", "type", "super", "id"})


def trace_modes(
    model: nn.Module,
    ignore: re.Pattern[str] | None,
    input_shape: Sequence[int] | None,
    notes: list[str],
) -> list[tuple[str, fx.Graph]]:
    """The inference graphs and the training ones (whose train-only branches, auxiliary
    heads, read channels too), by :func:`trace_parts`; one mode failing is a note."""
    graphs: list[tuple[str, fx.Graph]] = []
    failed: list[tuple[bool, UntraceableModelError]] = []
    for training in (False, True):
        try:
            graphs += trace_parts(
                model, ignore, training=training, input_shape=input_shape, notes=notes
            )
        except UntraceableModelError as err:
            failed.append((training, err))
    if not graphs:
        raise failed[0][1]
    for training, error in failed:
        mode = "training" if training else "inference"
        notes.append(f"only one mode traced; the {mode} graph failed: {error}")
    return graphs


def trace_parts(
    model: nn.Module,
    ignore: re.Pattern[str] | None,
    *,
    training: bool,
    input_shape: Sequence[int] | None = None,
    notes: list[str] | None = None,
) -> list[tuple[str, fx.Graph]]:
    """``[("", graph)]`` for a model fx traces; else ``[(prefix, graph), ...]`` of its parts.

    A part's graph names its modules relative to the part (``prefix`` + name is the
    path in ``model``). Raises the root's :class:`~tdump.errors.UntraceableModelError`
    when the failure is in a submodule (``--ignore`` it) or no part traces.
    """
    try:
        return [("", trace(model, ignore, training=training, input_shape=input_shape, notes=notes))]
    except UntraceableModelError as err:
        if not getattr(err, "in_root", False):
            raise
        parts = list(_parts(model, "", ignore, training))
        if not parts:
            raise
        if notes is not None:
            note = (
                f"{type(model).__name__}.forward cannot be traced ({_why(err)}); its parts "
                f"were traced, each alone: {listed([p.rstrip('.') for p, _ in parts], 8)}"
                + " (their inputs and outputs, and the rest of the model, are left alone)"
                + (
                    "; a forward that branches only on shapes traces whole at its input "
                    "shape: --input-shape C,H,W (input_shape= in Python)"
                    if input_shape is None
                    else ""
                )
            )
            if note not in notes:
                notes.append(note)
        return parts


def _parts(
    module: nn.Module, prefix: str, ignore: re.Pattern[str] | None, training: bool
) -> list[tuple[str, fx.Graph]]:
    called = _only_called(type(module))
    found: list[tuple[str, fx.Graph]] = []
    for name, child in module.named_children():
        path = prefix + name
        if name not in called or (ignore is not None and ignore.search(path)):
            continue
        if layer_base(type(child)) is not None or not any(True for _ in child.parameters()):
            continue  # one layer alone, or nothing to prune: no channels of its own
        try:
            graph = trace(child, ignore, training=training, prefix=path + ".")
        except UntraceableModelError:
            found.extend(_parts(child, path + ".", ignore, training))
            continue
        found.append((path + ".", graph))
    return found


def _only_called(cls: type) -> set[str]:
    """Attributes ``self.X`` that ``cls``'s methods (but ``__init__``) use only as ``self.X(...)``.

    Empty when the code cannot be read or hands ``self`` on (anything could then reach
    any module).
    """
    called: set[str] = set()
    other: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not issubclass(klass, nn.Module):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name == "__init__":
                continue
            parents = {c: p for p in ast.walk(fn) for c in ast.iter_child_nodes(p)}
            for node in ast.walk(fn):
                if not (isinstance(node, ast.Name) and node.id == "self"):
                    continue
                up = parents.get(node)
                if isinstance(up, ast.Attribute):
                    above = parents.get(up)
                    if isinstance(above, ast.Call) and above.func is up:
                        called.add(up.attr)
                    else:
                        other.add(up.attr)
                elif isinstance(up, ast.Call) and _callee(up) in _SELF_OK:
                    continue
                else:
                    return set()  # `helper(self)`, `getattr(self, name)`: unknown reads
    return called - other


def _why(err: UntraceableModelError) -> str:
    """fx's reason alone: ``Proxy object cannot be iterated``."""
    text = str(err).split("; ")[0]
    return text.split(": ", 1)[-1].split(". ")[0]


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else None
