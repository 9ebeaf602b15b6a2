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
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ScalerWatch", "check_scaler", "scale_of", "unscale"]

log = logging.getLogger("tdump.capture")


def check_scaler(scaler: Any) -> bool:
    """Whether ``scaler`` looks like a ``GradScaler`` (``is_enabled`` and ``scale`` methods)."""
    return callable(getattr(scaler, "is_enabled", None)) and callable(
        getattr(scaler, "scale", None)
    )


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

    ``tdump record`` runs scripts unmodified, so it learns of their scaler this way.
    An error in ``on_scale`` is logged, never raised into training.
    """

    def __init__(self, on_scale: Callable[[Any], None]) -> None:
        cls = torch.amp.GradScaler
        original = cls.scale

        @functools.wraps(original)
        def scale(scaler: Any, outputs: Any) -> Any:
            try:
                on_scale(scaler)
            except Exception as exc:  # capture never crashes training
                log.warning("tdump: noting the GradScaler failed: %s", exc)
            return original(scaler, outputs)

        self._original = original
        self._patched = scale
        cls.scale = scale  # type: ignore[method-assign, assignment]

    def remove(self) -> None:
        """Restore ``GradScaler.scale`` (unless a later watch replaced it since)."""
        cls = torch.amp.GradScaler
        if cls.__dict__.get("scale") is self._patched:
            cls.scale = self._original  # type: ignore[method-assign]
