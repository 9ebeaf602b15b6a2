"""Parsing of option values that several commands share (``--arch-kwargs``, ``--input-shape``).

Examples
--------
>>> json_object_option('{"num_classes": 10}', "--arch-kwargs")
{'num_classes': 10}
>>> shape_option("3x32x32", example="3,32,32")
(3, 32, 32)
"""

from __future__ import annotations

import json
from typing import Any

from tdump.errors import ConfigError

__all__ = ["json_object_option", "shape_option"]


def json_object_option(text: str | None, flag: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object (``None`` when not given); one-line errors name ``flag``."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc.msg}): {text}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text}")
    return value


def shape_option(text: str, *, example: str) -> tuple[int, ...]:
    """An input shape such as ``3,224,224`` or ``3x224x224`` (batch excluded).

    Every part must be a size: ``1,x,28`` or ``3,,32`` is refused, not read as fewer dims.
    """
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(v) for v in parts)  # int() refuses an empty or non-numeric part
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):  # a zero or negative size cannot be run
        raise ConfigError(
            f"--input-shape must look like {example} (positive sizes, batch excluded), got {text!r}"
        )
    return shape
