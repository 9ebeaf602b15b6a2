"""Pluggable normalisation of a layer's scores, and aggregation of coupled convs' scores.

Global pruning compares channels of different layers, so each layer's scores are first
put on one scale (:func:`normalize`): by default divided by the layer's mean absolute
score, so a channel scores 1.0 when it is as important as its layer's average channel,
whatever the layer's width. (Dividing by the layer's L2 norm, the ``score_norm`` of a
ranks file, scales like ``1/sqrt(channels)``: the widest layers would always look
weakest and be emptied first.)

A residual group's channels are removed from every member conv at once, so each
channel needs one score: the aggregate of the members' normalised scores.

Examples
--------
>>> import numpy as np
>>> aggregate("mean", np.array([[1.0, 2.0], [3.0, 4.0]]))
array([2., 3.])
>>> register_aggregation("l2", lambda s: np.sqrt((s**2).sum(axis=0)))
>>> "l2" in aggregations()
True
>>> normalize("mean", np.array([1.0, 3.0])), normalize("l2", np.array([3.0, 4.0]))
(array([0.5, 1.5]), array([0.6, 0.8]))
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tdump.errors import ConfigError

__all__ = [
    "NORMALIZATIONS",
    "Aggregation",
    "aggregate",
    "aggregations",
    "normalize",
    "register_aggregation",
]

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


def _scaled(scale: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    def fn(s: np.ndarray) -> np.ndarray:
        d = float(scale(s)) if s.size else 0.0
        return s / d if d > 0 and np.isfinite(d) else s

    return fn


#: Per-layer normalisations: ``mean`` (default) and ``rms`` do not depend on the width;
#: ``l2`` is the rank stage's ``score_norm`` (width-biased, kept to reproduce old plans).
NORMALIZATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": _scaled(lambda s: np.abs(s).mean()),
    "rms": _scaled(lambda s: np.sqrt((s * s).mean())),
    "l2": _scaled(lambda s: np.sqrt((s * s).sum())),
    "none": lambda s: s,
}


def normalize(name: str, scores: np.ndarray) -> np.ndarray:
    """One layer's ``scores`` on the common scale ``name`` (a key of :data:`NORMALIZATIONS`)."""
    try:
        fn = NORMALIZATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown normalisation {name!r}; choose one of {', '.join(NORMALIZATIONS)}"
        ) from None
    return fn(np.asarray(scores, dtype=np.float64))
