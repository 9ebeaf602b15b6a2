"""torch.fx tracing for the channel graph: ignored modules stay whole, failures name the module.

fx cannot follow Python control flow on tensors. Given the model's input shape,
:func:`trace` retries a model whose ``forward`` branches on shapes (``if x.dim() == 3``,
``if y.shape[-1] != skip.shape[-1]``) with :class:`_ShapeTracer`, which answers each
branch from fake tensors of that shape (no data, no arithmetic) and so traces the path
inputs of that shape take. A branch on tensor values (``if y.mean() > 0``) is still
refused: a fake tensor has no values.

Examples
--------
>>> import torch
>>> len(list(trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))).nodes))
3
>>> class Gray(torch.nn.Module):
...     def __init__(self):
...         super().__init__(); self.conv = torch.nn.Conv2d(1, 4, 3)
...     def forward(self, x):
...         return self.conv(x.unsqueeze(1) if x.dim() == 3 else x)
>>> [n.target for n in trace(Gray(), input_shape=(28, 28)).nodes][-3:]
['unsqueeze', 'conv', 'output']
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import fx, nn

from tdump._modtypes import layer_base
from tdump.errors import UntraceableModelError, first_line
from tdump.surgery._weight_norm import copy_model

__all__ = ["trace"]


class _Tracer(fx.Tracer):
    """fx tracer that keeps ignored modules whole and remembers where tracing failed."""

    def __init__(self, ignore: re.Pattern[str] | None, prefix: str = "") -> None:
        super().__init__()
        self.ignore = ignore
        self.prefix = prefix  # the traced module's path in the model (``ignore`` sees full paths)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            self.ignore is not None
            and module_qualified_name
            and self.ignore.search(self.prefix + module_qualified_name)
        ):
            return True
        if layer_base(type(m)) is not None:  # a torch layer, or a subclass computing as it
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


class _ShapeTracer(_Tracer):
    """:class:`_Tracer` that answers control flow on shapes from fake tensors of one input shape.

    Every node gets a value computed on fake tensors (shapes and dtypes, no data) as it
    is created; ``bool()`` and iteration of a traced value use it when it is a plain
    Python value (an int, a bool, a shape), which a branch on a shape gives.
    """

    def __init__(self, ignore: re.Pattern[str] | None, input_shape: Sequence[int]) -> None:
        super().__init__(ignore)
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.example = self.fake_mode.from_tensor(torch.empty(1, *input_shape))
        self.values: dict[fx.Node, Any] = {}
        self.model: nn.Module | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # values come from a copy: a module run in training mode updates its buffers
        # (BatchNorm's running stats and batch count), which must stay the model's own
        self.model = copy_model(root)
        try:
            return super().trace(root, concrete_args)
        finally:
            self.model = None
            self.values.clear()

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any
    ) -> Any:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        self.values[proxy.node] = self._value(proxy.node)
        return proxy

    def _value(self, node: fx.Node) -> Any:
        """The node's value on fake tensors, or ``None`` where it cannot be had."""
        # fx patches nn.Module.__call__ while tracing: undo that to run modules for real
        from torch.fx._symbolic_trace import _maybe_revert_all_patches

        if node.op == "placeholder":  # the input; later placeholders are other arguments
            first = not any(n.op == "placeholder" for n in self.values)
            return self.example if first else None
        try:
            args = fx.node.map_arg(node.args, self.values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
            with _maybe_revert_all_patches(), self.fake_mode:
                if node.op == "get_attr":
                    return operator.attrgetter(str(node.target))(self.model)
                if node.op == "call_module":
                    assert self.model is not None
                    return self.model.get_submodule(str(node.target))(*args, **kwargs)
                if node.op == "call_function":
                    return node.target(*args, **kwargs)  # type: ignore[operator]
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        except Exception:  # an op fake tensors cannot run: a branch on it is refused below
            return None
        return None

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node)
        if isinstance(value, (bool, int)):  # a shape comparison, not a tensor's values
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.values.get(obj.node)
        if isinstance(value, (tuple, list)):  # ``n, c, h, w = x.shape``
            return iter([cast(Any, obj)[i] for i in range(len(value))])
        return super().iter(obj)


def trace(
    model: nn.Module,
    ignore: re.Pattern[str] | None = None,
    *,
    training: bool = False,
    input_shape: Sequence[int] | None = None,
    notes: list[str] | None = None,
    prefix: str = "",
) -> fx.Graph:
    """Symbolically trace ``model`` in eval (or ``training``) mode.

    ``input_shape`` (batch excluded), when given, lets a model whose forward branches
    on shapes trace at that shape where plain fx fails; ``notes`` then gets a line
    saying so. ``prefix``: ``model``'s path in the model ``ignore`` names paths of.

    Raises :class:`UntraceableModelError` naming the module fx failed in (its
    ``in_root`` is true when the failing code is ``model``'s own).
    """
    tracer = _Tracer(ignore, prefix)
    was_training = model.training
    model.train(training)
    with warnings.catch_warnings():
        # fx's proxies need no gradient: torch.utils.checkpoint in a training-mode
        # forward says so, which tells the user nothing about their model
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad", UserWarning)
        return _trace(model, tracer, ignore, input_shape, notes, was_training)


def _trace(
    model: nn.Module,
    tracer: _Tracer,
    ignore: re.Pattern[str] | None,
    input_shape: Sequence[int] | None,
    notes: list[str] | None,
    was_training: bool,
) -> fx.Graph:
    try:
        try:
            return tracer.trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
            if input_shape is None:
                raise _untraceable(model, tracer, exc, None) from None
            plain = exc
        shaped = _ShapeTracer(ignore, input_shape)
        try:
            graph = shaped.trace(model)
        except Exception:
            raise _untraceable(model, tracer, plain, input_shape) from None
        if notes is not None:
            shown = "x".join(map(str, input_shape))
            note = (
                f"traced at input shape {shown}: {type(model).__name__}'s forward branches "
                f"on shapes ({first_line(plain, None)}), so its channels are those of the "
                "path inputs of that shape take"
            )
            if note not in notes:
                notes.append(note)
        return graph
    finally:
        model.train(was_training)


def _untraceable(
    model: nn.Module, tracer: _Tracer, exc: Exception, input_shape: Sequence[int] | None
) -> UntraceableModelError:
    where = tracer.failed_in or ""
    if where:
        fix = (
            "pass ignore=REGEX (--ignore REGEX) matching it to keep it whole and leave "
            "its channels alone"
        )
        label = f"module '{where}' ({type(model.get_submodule(where)).__name__})"
    else:  # the root's own code: no regex can make the root a leaf
        name = type(model).__name__
        fix = (
            f"the failing code is in {name}.forward itself, which --ignore cannot keep "
            "whole: move it (a branch on a tensor's value or shape, such as "
            "`if x.dim() == 3:`) into a submodule and pass --ignore (ignore= in Python) "
            "matching that submodule, or out of the model (into the data pipeline)"
        )
        label = f"model {name}"
    if input_shape is None:
        fix += (
            "; a branch on shapes alone traces when the input shape is known "
            "(--input-shape C,H,W, or --dump DUMP that recorded it; input_shape= in Python)"
        )
    else:
        shown = "x".join(map(str, input_shape))
        fix = f"tracing at input shape {shown} failed too; {fix}"
    error = UntraceableModelError(f"torch.fx cannot trace {label}: {first_line(exc, None)}; {fix}")
    error.in_root = not where  # type: ignore[attr-defined]
    return error
