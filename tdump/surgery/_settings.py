"""How channels are selected: :class:`Settings`, checked when made, and :func:`resolve_settings`.

The selection keywords of :func:`tdump.surgery.plan` and :func:`tdump.surgery.prune` as
one immutable value; :mod:`tdump.surgery._plan` selects with it.

Examples
--------
>>> Settings(count=8).scope
'global'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tdump.errors import ConfigError
from tdump.surgery._aggregate import NORMALIZATIONS, aggregations

__all__ = ["Settings", "resolve_settings"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How channels are selected, checked when made (see :func:`tdump.surgery.prune`).

    The selection keywords of :func:`tdump.surgery.plan` and :func:`tdump.surgery.prune`
    as one immutable value: build it once (``tdump prune`` does, from its options, before
    reading any file) and pass it as ``settings=``; it is used as it is. Change one with
    :func:`dataclasses.replace`, which checks the result again.

    Parameters
    ----------
    count, ratio : int or float
        Exactly one: channels to remove, or the fraction of candidate channels.
    scope : {"global", "per-layer"}
        Rank all groups together, or prune each group by itself.
    min_channels : int
        Every group keeps at least this many channels (>= 1).
    max_ratio : float, optional
        At most this fraction of any one group goes, in (0, 1]; ``None`` is
        :data:`DEFAULT_MAX_RATIO` with ``scope="global"``.
    round_to : int, optional
        Kept counts stay multiples of this (>= 1).
    conv_only_groups : bool
        Leave residual groups alone.
    aggregate : str
        How a group's members' scores combine (a registered aggregation).
    normalize : {"mean", "rms", "l2", "none"}
        Per-layer score scale before groups are aggregated and ranked.

    Raises
    ------
    ConfigError
        An inconsistent or out-of-range value (one line, naming the CLI option).

    Examples
    --------
    >>> Settings(ratio=0.3, scope="per-layer").min_channels
    1
    >>> Settings(ratio=1.5)
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: ratio must be in [0, 1) (a ratio of 1 would empty layers), got 1.5
    """

    count: int | None = None
    ratio: float | None = None
    scope: str = "global"
    min_channels: int = 1
    max_ratio: float | None = None
    round_to: int | None = None
    conv_only_groups: bool = False
    aggregate: str = "mean"
    normalize: str = "mean"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` for inconsistent settings (done when one is made)."""
        if self.count is None and self.ratio is None:
            raise ConfigError(
                "say how much to prune: a fraction of the channels (--ratio 0.2) or a number "
                "of channels (--count 200)"
            )
        if self.count is not None and self.ratio is not None:
            raise ConfigError("give only one of count (--count) and ratio (--ratio), not both")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 0):
            raise ConfigError(f"count must be a non-negative integer, got {self.count!r}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ConfigError(
                f"ratio must be in [0, 1) (a ratio of 1 would empty layers), got {self.ratio}"
            )
        if self.scope not in ("global", "per-layer"):
            raise ConfigError(f"scope must be 'global' or 'per-layer', got {self.scope!r}")
        if self.min_channels < 1:
            raise ConfigError(
                f"min_channels must be >= 1 (a layer cannot be emptied), got {self.min_channels}"
            )
        if self.max_ratio is not None and not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"max_ratio must be in (0, 1], got {self.max_ratio}")
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown normalize {self.normalize!r}; choose one of {', '.join(NORMALIZATIONS)}"
            )
        # a name is looked up only when a group has several members: say it before that
        if isinstance(self.aggregate, str) and self.aggregate not in aggregations():
            raise ConfigError(
                f"unknown aggregation {self.aggregate!r}; choose one of {', '.join(aggregations())}"
            )


#: Each selection keyword's default (those of :class:`Settings`, :func:`tdump.surgery.plan`
#: and :func:`tdump.surgery.prune`).
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}


def resolve_settings(settings: Settings | None, **options: Any) -> Settings:
    """The settings a :func:`~tdump.surgery.plan` / :func:`~tdump.surgery.prune` call selects with.

    The one place selection keywords become a :class:`Settings` (checked as it is made):
    ``settings`` itself when given, as it is, and then every option must keep its
    default; else ``Settings(**options)``.

    Parameters
    ----------
    settings : Settings, optional
        Settings made (and so checked) by the caller, e.g. ``tdump prune``.
    **options
        The selection keywords of :class:`Settings`.

    Raises
    ------
    ConfigError
        A bad value, ``settings`` not a :class:`Settings`, or both ``settings`` and a
        selection keyword.

    Examples
    --------
    >>> s = Settings(count=8)
    >>> resolve_settings(s, count=None) is s, resolve_settings(None, ratio=0.5).ratio
    (True, 0.5)
    >>> resolve_settings(s, scope="per-layer")
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: give settings= or the selection keywords, not both (got scope='per-layer' too); put them in the settings: dataclasses.replace(settings, scope='per-layer')
    """
    if settings is None:
        return Settings(**options)
    if not isinstance(settings, Settings):
        raise ConfigError(
            f"settings must be a tdump.surgery.Settings, got {type(settings).__name__}: "
            "Settings(ratio=0.3, ...)"
        )
    given = ", ".join(f"{k}={v!r}" for k, v in options.items() if v != _DEFAULTS[k])
    if given:
        raise ConfigError(
            f"give settings= or the selection keywords, not both (got {given} too); "
            f"put them in the settings: dataclasses.replace(settings, {given})"
        )
    return settings
