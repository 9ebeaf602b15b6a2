"""The wrapper of every callable tdump registers on a user's modules and tensors.

A copy of a module (``copy.deepcopy``, ``torch.save`` then ``torch.load``) gets a
disarmed hook in its place, ``functools.partial(sys.audit, DISARMED_EVENT)``: it
records nothing, returns ``None`` (so the module's output stays its own), and names
only the standard library, so loading a whole model pickled under capture does not
need tdump installed.

Examples
--------
>>> import copy, pickle, sys
>>> g = Guarded(None, print)  # type: ignore[arg-type]
>>> c, p = copy.deepcopy(g), pickle.loads(pickle.dumps(g))
>>> (c.func, c.args) == (p.func, p.args) == (sys.audit, (DISARMED_EVENT,))
True
>>> p(None, (1,), 2) is None  # a forward hook's arguments: nothing happens
True
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tdump.capture._exit import TrainingStopped

if TYPE_CHECKING:
    from tdump.capture._hook import Hook

__all__ = ["DISARMED_EVENT", "Guarded", "no_hook"]

#: The audit event a disarmed hook raises (``sys.audit``: nothing, unless an audit hook
#: is installed, which then sees this name and the hook's arguments).
DISARMED_EVENT = "tdump.disarmed_hook"


class Guarded:
    """A hook body that switches capture off on an error (re-raises if strict).

    Every callable tdump registers on the user's modules is one of these, not a
    closure: ``torch.save(model)`` and ``copy.deepcopy(model)`` copy the modules' hook
    dicts, and a closure cannot be pickled (torch.save fails) while a deep copy keeps
    the same function, so an EMA copy's forward would count as a step of this hook
    and record a made-up train step. Pickled or copied, it becomes a disarmed hook
    (the module docstring).
    """

    __slots__ = ("fn", "hook")

    def __init__(self, hook: Hook, fn: Callable[..., Any]) -> None:
        self.hook = hook
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hook = self.hook
        if not hook._enabled:
            return None
        try:
            return self.fn(*args, **kwargs)
        except TrainingStopped:
            raise  # ends training on purpose
        except Exception as exc:
            hook._fail(exc)
            return None

    def __reduce__(self) -> tuple[type[functools.partial[None]], tuple[Any, str]]:
        # copy.deepcopy uses this too (no __deepcopy__): a copy carries no live hook.
        # sys.audit takes any positional arguments after the event's name and returns
        # None, and a pickle of it names only builtins: a whole-model pickle loads and
        # runs where tdump is not installed.
        return functools.partial, (sys.audit, DISARMED_EVENT)


def no_hook(*args: Any, **kwargs: Any) -> None:
    """What a whole-model pickle from an earlier tdump rebuilds a hook as: it does nothing."""


def _disarmed() -> Callable[..., None]:
    """Rebuild a :class:`Guarded` pickled by an earlier tdump (kept so those pickles load)."""
    return no_hook
