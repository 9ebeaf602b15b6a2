"""The prune plan as data, and how it is chosen from ranks.

A :class:`Plan` maps each conv whose output channels change to the channel count it
had and the sorted indices it keeps. It is JSON-able: save it, inspect it, replay it
on another copy of the model (:func:`tdump.surgery.apply`). Plans compose: pruning
an already pruned model gives indices relative to the original channels.

Examples
--------
>>> p = Plan(layers={"conv1": LayerPlan(channels=4, keep=[0, 2])})
>>> Plan.from_json(p.to_json()).layers["conv1"].keep
[0, 2]
>>> Plan(layers={"conv1": LayerPlan(4, [1, 3])}).compose(Plan(layers={"conv1": LayerPlan(2, [1])})).layers
{'conv1': LayerPlan(channels=4, keep=[3])}
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tdump.errors import ConfigError, RanksError
from tdump.surgery._aggregate import (
    Aggregation,
    aggregate,
    normalize,
)
from tdump.surgery._graph import ChannelGraph, Group
from tdump.surgery._plan_notes import global_shortfall, pooled, say_shortfall, unranked_notes
from tdump.surgery._settings import Settings, resolve_settings
from tdump.surgery._units import (
    pick_global,
    removal_bounds,
    removal_order,
    round_removal,
    unit_bounds,
)

__all__ = [
    "DEFAULT_MAX_RATIO",
    "FEW_CHANNELS",
    "FewChannelsWarning",
    "LayerPlan",
    "Plan",
    "Settings",
    "group_cap",
    "keeps_for",
    "resolve_max_ratio",
    "resolve_settings",
    "select",
]

PLAN_FORMAT = "tdump.plan"
#: A pruned group left with fewer channels than this gets a warning (and a note).
FEW_CHANNELS = 4
#: ``scope="global"`` with ``max_ratio=None``: no group loses more than this fraction.
DEFAULT_MAX_RATIO = 0.8


def resolve_max_ratio(max_ratio: float | None, scope: str) -> float | None:
    """The ``max_ratio`` a selection applies: :data:`DEFAULT_MAX_RATIO` for an unset global one.

    >>> resolve_max_ratio(None, "global"), resolve_max_ratio(None, "per-layer"), resolve_max_ratio(0.5, "global")
    (0.8, None, 0.5)
    """
    if max_ratio is None and scope == "global":
        return DEFAULT_MAX_RATIO
    return max_ratio


def group_cap(grp: Group, min_channels: int, max_ratio: float | None) -> int:
    """Channels one selection may remove from ``grp``: it keeps ``min_channels`` (and a
    channel per block), loses at most ``max_ratio`` of its channels, in whole blocks;
    a group with units (GroupNorm groups) in whole units (:func:`group_bounds`)."""
    cap = grp.size - max(min_channels, grp.blocks)
    if max_ratio is not None:
        cap = min(cap, math.floor(max_ratio * grp.size + 1e-9))
    return max(cap, 0) // grp.blocks * grp.blocks


def group_bounds(grp: Group, order: np.ndarray, cap: int, round_to: int | None) -> list[int]:
    """The removal counts ``grp`` may take in ``order``, ascending, none above ``cap``."""
    if grp.units is not None:
        return unit_bounds(grp.units[order], cap, round_to)
    return removal_bounds(grp.size, grp.blocks, cap, round_to)


class FewChannelsWarning(UserWarning):
    """A pruned group keeps fewer than :data:`FEW_CHANNELS` channels (a near-empty layer)."""


@dataclass
class LayerPlan:
    """One conv's output channels: ``channels`` before, sorted ``keep`` indices after."""

    channels: int
    keep: list[int]


@dataclass
class Plan:
    """Kept output channels per conv, plus what produced them.

    Attributes
    ----------
    layers : dict[str, LayerPlan]
        Changed convs only; coupled convs (one group) share one ``keep``.
    groups : list[list[str]]
        Members of each changed group.
    settings : dict
        The selection settings (informational).
    notes : list[str]
        Groups left alone and why, and caps that limited the selection.
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        """Channels removed, counting each group's channel once."""
        return sum(self.removed_per_group)

    @property
    def removed_per_group(self) -> list[int]:
        """Channels each group in ``groups`` loses (its first member's), in that order."""
        return [
            self.layers[g[0]].channels - len(self.layers[g[0]].keep)
            for g in self.groups
            if g[0] in self.layers
        ]

    @property
    def removed_filters(self) -> int:
        """Output channels removed from the layers the plan lists (every member conv and Linear).

        Depthwise convs whose channels follow a concatenation are not listed; the CLI's
        summary counts every conv's filters from the model itself.
        """
        return sum(lp.channels - len(lp.keep) for lp in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return {
            "format": PLAN_FORMAT,
            "format_version": 1,
            "layers": {
                k: {"channels": v.channels, "keep": list(v.keep)} for k, v in self.layers.items()
            },
            "groups": [list(g) for g in self.groups],
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT or int(d.get("format_version", 1)) > 1:
            raise ConfigError(
                f"not a tdump.plan version 1 (format={d.get('format')!r}, version={d.get('format_version')!r})"
            )
        layers = {
            str(k): LayerPlan(int(v["channels"]), [int(i) for i in v["keep"]])
            for k, v in d.get("layers", {}).items()
        }
        return cls(
            layers,
            [list(g) for g in d.get("groups", [])],
            dict(d.get("settings", {})),
            list(d.get("notes", [])),
        )

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (atomically: temporary file + rename)."""
        path = os.fspath(path)
        tmp = f"{path}.partial"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())

    def compose(self, later: Plan) -> Plan:
        """This plan followed by ``later`` (whose indices refer to this plan's result)."""
        layers = dict(self.layers)
        for name, lp in later.layers.items():
            prev = layers.get(name)
            if prev is None:
                layers[name] = LayerPlan(lp.channels, list(lp.keep))
            else:
                if len(prev.keep) != lp.channels:
                    raise ConfigError(
                        f"plans do not compose at {name}: {len(prev.keep)} kept then {lp.channels} expected"
                    )
                base = np.asarray(prev.keep, dtype=np.int64)
                layers[name] = LayerPlan(
                    prev.channels, base[np.asarray(lp.keep, dtype=np.int64)].tolist()
                )
        merged = {tuple(g) for g in self.groups}
        groups = [list(g) for g in self.groups] + [
            list(g) for g in later.groups if tuple(g) not in merged
        ]
        return Plan(layers, groups, dict(later.settings), list(later.notes))


def _group_scores(
    grp: Group, scores: dict[str, np.ndarray], how: str | Aggregation, norm: str
) -> np.ndarray | None:
    ranked = [normalize(norm, scores[m]) for m in grp.members if m in scores]
    if not ranked:
        return None
    return ranked[0] if len(ranked) == 1 else aggregate(how, np.stack(ranked))


_MODULE_PATH = re.compile(r"\b[A-Za-z_][\w-]*(?:\.[\w-]+)+|\(groups=\d+\)")


def _summarize(groups: list[Group], what: str) -> list[str]:
    """One note per kind of reason (not one per group): how many groups, examples, a reason.

    Reasons that differ only in the module they name (``depthwise conv features.1.0...``)
    are one kind, so a refusal says the cause once and how many groups it hit.
    """
    by_kind: dict[str, list[Group]] = {}
    for grp in groups:
        by_kind.setdefault(_MODULE_PATH.sub("*", grp.reason), []).append(grp)
    out = []
    for grps in by_kind.values():
        names = [g.members[0] for g in grps[:3]]
        more = f", ... ({len(grps)} groups)" if len(grps) > 3 else ""
        eg = "e.g. " if len(grps) > 1 else ""
        out.append(f"{what} {', '.join(names)}{more}: {eg}{grps[0].reason}")
    return out


def _half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def select(graph: ChannelGraph, scores: dict[str, np.ndarray], settings: Settings) -> Plan:
    """Choose the channels to remove, as a :class:`Plan` (nothing is modified).

    Each conv's scores are first normalised (``settings.normalize``, by default divided
    by the layer's mean absolute score), then a group's members are aggregated.
    ``global`` ranks all candidate channels together and removes the lowest ``count``
    (or ``ratio`` of all candidate channels); ``per-layer`` removes ``count`` (or
    ``ratio``) from each group. Each group keeps at least ``min_channels`` and loses
    at most ``max_ratio`` of its channels (global default :data:`DEFAULT_MAX_RATIO`).
    A group loses channels in steps that keep it whole (a grouped conv's blocks equal,
    kept counts multiples of ``round_to``; :mod:`tdump.surgery._units`): ``global``
    takes whole steps, weakest first, up to ``count``; ``per-layer`` rounds each
    group's removal down to a step. Every shortfall is said in ``notes``. A group left with
    fewer than :data:`FEW_CHANNELS` channels gets a note and a :class:`FewChannelsWarning`.
    ``settings`` was checked when it was made (:class:`Settings`).
    """
    max_ratio = resolve_max_ratio(settings.max_ratio, settings.scope)
    notes: list[str] = list(graph.notes)
    frozen: list[Group] = []
    cands: list[tuple[Group, tuple[np.ndarray, np.ndarray], int]] = []
    unranked: list[Group] = []
    for grp in graph.groups:
        s = _group_scores(grp, scores, settings.aggregate, settings.normalize)
        if s is None:
            if not grp.frozen:
                unranked.append(grp)
            continue
        if grp.frozen:
            frozen.append(grp)
            continue
        if settings.conv_only_groups and grp.residual:
            notes.append(
                f"left alone residual group of {len(grp.members)} convs ({', '.join(grp.members[:3])}...): "
                "conv_only_groups skips channels coupled through additions"
            )
            continue
        cap = group_cap(grp, settings.min_channels, max_ratio)
        cands.append((grp, removal_order(grp.blocks, s, grp.units), cap))
    notes[len(graph.notes) : len(graph.notes)] = _summarize(frozen, "left alone")
    if cands:
        notes.extend(unranked_notes(cands, unranked, scores))
    if not cands:
        if scores:
            hint = (
                f"; {len(unranked)} prunable groups have no ranks (e.g. {unranked[0].members[0]}): "
                "give them scores"
                if unranked
                else ""
            )
            raise RanksError(
                "no ranked layer can be pruned: "
                + ("; ".join(notes) or "no ranked conv was traced")
                + hint
            )
        raise RanksError("the ranks table is empty")

    for layer in scores:
        if graph.group_of(layer) is None:
            # an ignored module (or one inside it) is traced whole: no call of its own
            parts = layer.split(".")
            prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
            pattern = graph.ignore or ""
            ignored = bool(pattern) and any(re.search(pattern, p) for p in prefixes)
            if layer in graph.uses:
                why = "its channels follow its inputs' (depthwise conv over a concatenation)"
            elif ignored:
                why = f"ignore {graph.ignore!r} leaves it alone"
            elif graph.parts and not any(layer.startswith(p) for p in graph.parts):
                why = "it is outside the parts of the model torch.fx traced"
            else:
                why = "the traced forward never calls it"
            notes.append(f"ranks of {layer} not used: {why}")
    removed: dict[int, int] = {}
    if settings.scope == "per-layer":
        capped = []
        for grp, _, cap in cands:
            want = (
                settings.count
                if settings.count is not None
                else _half_up((settings.ratio or 0.0) * grp.size)
            )
            removed[grp.gid] = min(int(want), cap)
            if want > cap:
                capped.append(grp.members[0])
        if capped:
            asked = (
                f"{settings.count} channels"
                if settings.count is not None
                else f"{settings.ratio:.0%} of the channels"
            )
            notes.append(
                f"asked to remove {asked} per group but min_channels/max_ratio allow fewer in "
                f"{len(capped)} of {len(cands)} groups (e.g. {capped[0]})"
            )
    else:
        total = sum(g.size for g, _, _ in cands)
        want = (
            settings.count
            if settings.count is not None
            else _half_up((settings.ratio or 0.0) * total)
        )
        steps = [
            (grp.gid, pos_scores, group_bounds(grp, order, cap, settings.round_to))
            for grp, (order, pos_scores), cap in cands
        ]
        pool = sum(bounds[-1] for _, _, bounds in steps if bounds)
        if want > pool:
            notes.append(
                (
                    f"asked to remove {want} channels"
                    if settings.count is not None
                    else f"asked to remove {settings.ratio:.0%} of the channels ({want} of {total})"
                )
                + f" but min_channels/max_ratio allow {pool}"
                + (
                    " in whole steps (grouped convs, GroupNorm groups, round_to)"
                    if pool < pooled(cands)
                    else ""
                )
            )
        removed = pick_global(steps, int(want))
        if sum(removed.values()) < min(want, pool):
            notes.append(global_shortfall(cands, removed, int(want), settings.round_to))

    plan = Plan(settings={**vars(settings), "max_ratio": max_ratio}, notes=notes)
    few: list[str] = []
    short = {"blocks": 0, "units": 0, "round_to": 0, "groups": 0}
    for grp, (order, _), _ in cands:
        chosen = removed.get(grp.gid, 0)
        if grp.units is not None:  # whole units: the largest allowed count not above chosen
            whole = max(group_bounds(grp, order, chosen, None), default=0)
            r = max(group_bounds(grp, order, whole, settings.round_to), default=0)
            short["units"] += chosen - whole
        else:
            whole = chosen // grp.blocks * grp.blocks
            r = round_removal(grp.size, whole, grp.blocks, settings.round_to)
            short["blocks"] += chosen - whole
        short["round_to"] += whole - max(r, 0)
        short["groups"] += r < chosen
        if r <= 0:
            continue
        keep = np.sort(order[r:]).tolist()
        for m in grp.members:
            plan.layers[m] = LayerPlan(grp.size, keep)
        plan.groups.append(list(grp.members))
        if len(keep) < FEW_CHANNELS and len(keep) * 8 <= grp.size:  # a wide layer nearly emptied
            few.append(f"{grp.members[0]} {grp.size} -> {len(keep)}")
    say_shortfall(plan, short, sum(removed.values()), settings.scope)
    if few:
        msg = (
            f"{len(few)} group(s) keep fewer than {FEW_CHANNELS} channels ({', '.join(few[:4])}"
            f"{', ...' if len(few) > 4 else ''}); set max_ratio (--max-ratio) or min_channels "
            "(--min-channels) to keep more"
        )
        plan.notes.append(msg)
        warnings.warn(msg, FewChannelsWarning, stacklevel=3)
    return plan


def _whole_units(units: np.ndarray, keep: np.ndarray) -> bool:
    """Whether ``keep`` holds every pinned channel and all or none of each unit."""
    kept = np.zeros(len(units), dtype=bool)
    kept[keep] = True
    if not kept[units < 0].all():
        return False
    free = units >= 0
    per_unit = np.bincount(units[free], weights=kept[free], minlength=int(units.max()) + 1)
    sizes = np.bincount(units[free], minlength=int(units.max()) + 1)
    return bool(np.all((per_unit == 0) | (per_unit == sizes)))


def keeps_for(graph: ChannelGraph, plan: Plan) -> dict[int, np.ndarray]:
    """Turn a plan into per-group kept indices for ``graph``, checking it fits."""
    keeps: dict[int, np.ndarray] = {}
    for name, lp in plan.layers.items():
        grp = graph.group_of(name)
        if grp is None:
            raise ConfigError(
                f"plan names layer '{name}', which is not a conv or Linear of this model"
            )
        if grp.size != lp.channels:
            raise ConfigError(
                f"plan expects {lp.channels} channels in '{name}' but the model has {grp.size}"
            )
        keep = np.asarray(lp.keep, dtype=np.int64)
        if keep.size == 0 or keep.min() < 0 or keep.max() >= grp.size or np.any(np.diff(keep) <= 0):
            raise ConfigError(
                f"plan keeps invalid indices in '{name}' (need sorted, unique, within 0..{grp.size - 1})"
            )
        prev = keeps.get(grp.gid)
        if prev is not None and not np.array_equal(prev, keep):
            raise ConfigError(
                f"plan keeps different channels in coupled layers {', '.join(grp.members[:4])}"
            )
        if grp.blocks > 1 and len(set(np.bincount(keep // (grp.size // grp.blocks)).tolist())) != 1:
            raise ConfigError(f"plan keeps unequal channels in the {grp.blocks} groups of '{name}'")
        if grp.units is not None and not _whole_units(grp.units, keep):
            raise ConfigError(
                f"plan keeps part of a GroupNorm group in '{name}' (its channels go in "
                "whole groups, and those in groups that span other layers stay)"
            )
        keeps[grp.gid] = keep
    for gid in keeps:
        grp = graph.groups[gid]
        absent = [m for m in grp.members if m not in plan.layers]
        if absent:
            raise ConfigError(
                f"plan prunes {grp.members[0]} but not the coupled {', '.join(absent[:3])}"
            )
    return keeps
