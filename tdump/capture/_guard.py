"""The wrapper of every callable tdump registers on a user's modules and tensors.

A copy of a module (``copy.deepcopy``, ``torch.save`` then ``torch.load``) gets
:func:`no_hook` in its place: it records nothing and needs no live hook.

Examples
--------
>>> import copy, pickle
>>> g = Guarded(None, print)  # type: ignore[arg-type]
>>> copy.deepcopy(g) is no_hook, pickle.loads(pickle.dumps(g)) is no_hook
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tdump.capture._exit import TrainingStopped

if TYPE_CHECKING:
    from tdump.capture._hook import Hook

__all__ = ["Guarded", "no_hook"]


class Guarded:
    """A hook body that switches capture off on an error (re-raises if strict).

    Every callable tdump registers on the user's modules is one of these, not a
    closure: ``torch.save(model)`` and ``copy.deepcopy(model)`` copy the modules' hook
    dicts, and a closure cannot be pickled (torch.save fails) while a deep copy keeps
    the same function, so an EMA copy's forward would count as a step of this hook
    and record a made-up train step. Pickled or copied, it becomes :func:`no_hook`.
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

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        # copy.deepcopy uses this too (no __deepcopy__): a copy carries no live hook
        return _disarmed, ()


def no_hook(*args: Any, **kwargs: Any) -> None:
    """What a tdump hook of a pickled or deep-copied module is: it does nothing."""


def _disarmed() -> Callable[..., None]:
    """Rebuild a pickled :class:`Guarded` as :func:`no_hook`."""
    return no_hook
