"""Pluggable aggregation of coupled convs' channel scores into one score per group channel.

A residual group's channels are removed from every member conv at once, so each
channel needs one score: the aggregate of the members' (normalised) scores.

Examples
--------
>>> import numpy as np
>>> aggregate("mean", np.array([[1.0, 2.0], [3.0, 4.0]]))
array([2., 3.])
>>> register_aggregation("l2", lambda s: np.sqrt((s**2).sum(axis=0)))
>>> "l2" in aggregations()
True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tdump.errors import ConfigError

__all__ = ["Aggregation", "aggregate", "aggregations", "register_aggregation"]

Aggregation = Callable[[np.ndarray], np.ndarray]
"""``(members, channels)`` scores -> ``(channels,)`` scores; higher = more important."""

_REGISTRY: dict[str, Aggregation] = {
    "mean": lambda s: s.mean(axis=0),
    "max": lambda s: s.max(axis=0),
    "min": lambda s: s.min(axis=0),
    "sum": lambda s: s.sum(axis=0),
}


def register_aggregation(name: str, fn: Aggregation) -> None:
    """Make ``fn`` available as ``aggregate=name`` (replaces an existing one of that name)."""
    _REGISTRY[name] = fn


def aggregations() -> list[str]:
    """Names of the registered aggregations."""
    return sorted(_REGISTRY)


def aggregate(name: str | Aggregation, scores: np.ndarray) -> np.ndarray:
    """Apply the aggregation ``name`` (or a callable) to a ``(members, channels)`` array."""
    if callable(name):
        fn = name
    else:
        try:
            fn = _REGISTRY[name]
        except KeyError:
            raise ConfigError(
                f"unknown aggregation {name!r}; choose one of {', '.join(aggregations())}"
            ) from None
    out = np.asarray(fn(np.asarray(scores, dtype=np.float64)), dtype=np.float64)
    if out.shape != scores.shape[1:]:
        raise ConfigError(
            f"aggregation {name!r} returned shape {out.shape}, expected {scores.shape[1:]}"
        )
    return out
