"""torch.fx tracing for the channel graph: ignored modules stay whole, failures name the module.

Examples
--------
>>> import torch
>>> len(list(trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))).nodes))
3
"""

from __future__ import annotations

import re
from typing import Any

from torch import fx, nn

from tdump.errors import UntraceableModelError, first_line

__all__ = ["trace"]


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
        raise UntraceableModelError(
            f"torch.fx cannot trace {label}: {first_line(exc, None)}; {fix}"
        ) from None
    finally:
        model.train(was_training)
