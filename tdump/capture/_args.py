"""Checks of what a training script hands the hook: modules, losses, scalars.

Each refusal is one line that names what was given and what to pass instead.

Examples
--------
>>> described(len), described("a long string " * 5)
('the function len', "str 'a long string a long string a lon...")
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

from tdump.errors import ConfigError

__all__ = ["check_module", "described", "loss_module_for", "scalar_value"]


def described(value: Any) -> str:
    """``value`` for an error message: its type and a short repr (a function by its name)."""
    if isinstance(value, type):
        return f"the class {value.__name__}"
    if callable(value) and hasattr(value, "__name__"):
        return f"the function {getattr(value, '__qualname__', value.__name__)}"
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def loss_module_for(function: str | None) -> str | None:
    """``nn.<Loss>()`` computing what ``F.<function>`` does, when the names match.

    >>> loss_module_for("cross_entropy"), loss_module_for("mse_loss"), loss_module_for("f")
    ('nn.CrossEntropyLoss()', 'nn.MSELoss()', None)
    """
    if not function:
        return None
    key = function.removesuffix("_loss").replace("_", "").lower() + "loss"
    for attr in dir(nn):
        cls = getattr(nn, attr)
        if attr.lower() == key and isinstance(cls, type) and issubclass(cls, nn.Module):
            return f"nn.{attr}()"
    return None


def check_module(method: str, value: Any, expected: str) -> None:
    """Refuse (one line) a ``value`` that is not an ``nn.Module`` instance."""
    if isinstance(value, nn.Module):
        return
    if isinstance(value, type) and issubclass(value, nn.Module):
        raise ConfigError(
            f"{method} takes a module instance, not the class {value.__name__}; "
            f"create it first: {value.__name__}(...)"
        )
    raise ConfigError(f"{method} takes an nn.Module, not {described(value)}; pass {expected}")


def scalar_value(name: Any, value: Any) -> float | torch.Tensor:
    """``value`` of ``save_scalar(name, value)`` as a float or a tensor, else a ConfigError."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"save_scalar needs a name (a non-empty string), not {described(name)}; "
            'e.g. hook.save_scalar("lr", lr)'
        )
    call = f"save_scalar({name!r}, ...)"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            what = "complex" if value.is_complex() else f"of shape {tuple(value.shape)}"
            raise ConfigError(
                f"{call} takes a real number or a one-element tensor, not a tensor {what}; "
                "reduce it to one value first (value.mean())"
            )
        return value
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf":
        return float(value.reshape(()))
    if isinstance(value, numbers.Real):
        return float(value)
    raise ConfigError(
        f"{call} takes a real number or a one-element tensor, not {described(value)}; "
        "save numbers only (float(value) for a numeric string)"
    )
