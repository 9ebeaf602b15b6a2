"""Gradients under a ``GradScaler``: the loss scale is divided out as the copies are taken.

A ``torch.amp.GradScaler`` multiplies the loss by its scale (``2**16`` at first by
default) before backward, so every gradient that backward leaves, of parameters and
of activations alike, is the true one times that scale until ``scaler.unscale_``.
Recorded as they are, gradient rules would compare thresholds with scaled values and
a step's Taylor scores would weigh as much as its scale. So the hook divides each
gradient it copies by the scale its backward used (:func:`unscale`) and records that
scale as the step's ``scalars.grad_scale``.

Examples
--------
>>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
>>> print(scale_of(scaler))  # it has scaled nothing yet
None
>>> _ = scaler.scale(torch.ones(()))
>>> unscale(torch.tensor([2048.0, -512.0], dtype=torch.float16), scale_of(scaler))
tensor([ 2.0000, -0.5000])
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from tdump.capture._args import described
from tdump.errors import ConfigError

__all__ = [
    "ScalerWatch",
    "cover_scaler_classes",
    "hint_unregistered",
    "require_scaler",
    "scale_of",
    "unscale",
]

log = logging.getLogger("tdump.capture")


def require_scaler(scaler: Any) -> Any:
    """``scaler``, if it looks like a ``GradScaler`` (``is_enabled`` and ``scale``
    methods); else a one-line :class:`ConfigError`."""
    if not (
        callable(getattr(scaler, "is_enabled", None)) and callable(getattr(scaler, "scale", None))
    ):
        raise ConfigError(
            f"register_scaler takes a torch.amp.GradScaler, not {described(scaler)}; "
            "pass the scaler whose scale(loss) the training loop calls backward on"
        )
    return scaler


def scale_of(scaler: Any) -> torch.Tensor | None:
    """The scale ``scaler`` multiplies losses by now, as a tensor (no device sync).

    ``None`` when there is no scaler, it is disabled, or it has not scaled a loss yet.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    # the tensor itself: get_scale() would wait for the device on every saved step
    get_async = getattr(scaler, "_get_scale_async", None)
    scale = get_async() if callable(get_async) else getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale
    if scale is None and (callable(get_async) or hasattr(scaler, "_scale")):
        return None  # not initialised: no loss scaled yet
    return torch.tensor([float(scaler.get_scale())])  # a scaler without those internals


def unscale(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t / scale``: what ``scaler.unscale_`` makes of a gradient, as a new tensor.

    A float16 gradient becomes float32 (the true gradient is often below float16's
    range); a bfloat16 one stays bfloat16 (same range as float32, exact for the
    power-of-two scales a GradScaler uses); float32 and float64 keep their dtype.
    """
    s = scale.detach().to(t.device).reshape(1)  # 1-d: promotes float16 to float32
    out = (t.detach() / s).reshape(t.shape)
    return out.to(torch.bfloat16) if t.dtype == torch.bfloat16 else out


class ScalerWatch:
    """Call ``on_scale(scaler)`` on each ``GradScaler.scale`` call until :meth:`remove`.

    ``tdump record`` runs scripts unmodified, so it learns of their scaler this way,
    and an explicit hook says when a scaler it does not know scales a loss. One
    wrapper serves every watch; ``GradScaler.scale`` is itself again once the last
    watch is removed. An error in ``on_scale`` is logged, never raised into training.

    >>> seen = []
    >>> watch = ScalerWatch(seen.append)
    >>> scaler = torch.amp.GradScaler("cpu")
    >>> _ = scaler.scale(torch.ones(()))
    >>> watch.remove()
    >>> _ = scaler.scale(torch.ones(()))
    >>> seen == [scaler]
    True
    """

    def __init__(self, on_scale: Callable[[Any], None]) -> None:
        self._on_scale = on_scale
        _WATCHES.append(self)
        cover_scaler_classes()

    def notify(self, scaler: Any) -> None:
        """Tell ``on_scale`` (the wrapper calls this)."""
        try:
            self._on_scale(scaler)
        except Exception as exc:  # capture never crashes training
            log.warning("tdump: noting the GradScaler failed: %s", exc)

    def remove(self) -> None:
        """Stop watching; the last watch removed puts ``GradScaler.scale`` back."""
        if self in _WATCHES:
            _WATCHES.remove(self)
        if not _WATCHES:
            _uninstall()


_WATCHES: list[ScalerWatch] = []
#: The classes whose ``scale`` is wrapped now: ``class -> (our wrapper, their method)``.
_INSTALLED: dict[type, tuple[Any, Any]] = {}


def cover_scaler_classes() -> None:
    """While a watch is on, wrap ``scale`` of ``GradScaler`` and of every subclass that
    defines its own (FSDP's ``ShardedGradScaler`` does, without calling
    ``GradScaler.scale``). A class defined after the watch began is covered by the
    next call: the hook calls this at the start of each saved step."""
    if not _WATCHES:
        return
    todo: list[type] = [torch.amp.GradScaler]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        own = cls.__dict__.get("scale")
        if own is None or cls in _INSTALLED or not callable(own):
            continue
        _INSTALLED[cls] = (_wrap(own), own)
        cls.scale = _INSTALLED[cls][0]  # type: ignore[attr-defined]


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def scale(scaler: Any, outputs: Any) -> Any:
        for watch in list(_WATCHES):
            watch.notify(scaler)
        return original(scaler, outputs)

    return scale


def _uninstall() -> None:
    for cls, (ours, theirs) in _INSTALLED.items():
        if cls.__dict__.get("scale") is ours:  # replaced by something else since: leave theirs
            cls.scale = theirs  # type: ignore[attr-defined]
    _INSTALLED.clear()


def hint_unregistered(hook: weakref.ReferenceType[Any]) -> ScalerWatch:
    """A watch that says once that a ``GradScaler`` scales losses while ``hook`` (an
    explicit hook, weakly held) has no scaler registered."""
    said = False

    def on_scale(scaler: Any) -> None:
        nonlocal said
        h = hook()
        if h is None:  # a hook dropped without close(): its watch goes too
            watch.remove()
            return
        if said or h._scaler is not None or not scaler.is_enabled():
            return
        said = True
        log.warning(
            "tdump: a GradScaler scales the loss but the hook writing %s does not know it, "
            "so the gradients are recorded times its scale; call "
            "hook.register_scaler(scaler) to record the true ones",
            h.out,
        )

    watch = ScalerWatch(on_scale)
    return watch
