"""Which channel counts a group may lose, and the global choice over whole steps.

A group's removal is constrained twice: a grouped conv loses the same number of
channels from every block (so removals are multiples of ``blocks``; a GroupNorm's
channels go in whole *units*, its groups, see :func:`merge_units`), and
``round_to`` keeps the kept count a multiple of itself. Together the kept count is a
multiple of ``lcm(blocks, round_to)``, so a group can lose only certain amounts
(:func:`removal_bounds`). A global selection that picked channels one by one and
rounded afterwards would lose most of its picks to rounding (a RegNet's 25-block
conv with ``round_to=8`` can only lose 200 channels at a time); :func:`pick_global`
instead chooses whole steps, weakest first, so the total comes as close to the count
asked as those steps allow, never above it.

Examples
--------
>>> removal_bounds(size=64, blocks=1, cap=20, round_to=8)
[8, 16]
>>> removal_bounds(size=100, blocks=1, cap=30, round_to=8)
[4, 12, 20, 28]
>>> removal_bounds(size=400, blocks=25, cap=320, round_to=8)
[200]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "kept_multiple",
    "merge_units",
    "pick_global",
    "removal_bounds",
    "removal_order",
    "round_removal",
    "unit_bounds",
]


def kept_multiple(blocks: int, round_to: int | None) -> int:
    """What every kept count of a group is a multiple of."""
    return math.lcm(blocks, round_to or 1)


def removal_bounds(size: int, blocks: int, cap: int, round_to: int | None) -> list[int]:
    """Removal counts a group of ``size`` channels may take, ascending, none above ``cap``."""
    step = kept_multiple(blocks, round_to)
    return list(range(size % step or step, cap + 1, step))


def round_removal(size: int, removed: int, blocks: int, round_to: int | None) -> int:
    """The largest allowed removal not above ``removed`` (0 when none is)."""
    if removed <= 0:
        return 0
    step = kept_multiple(blocks, round_to)
    kept = math.ceil((size - removed) / step) * step
    return max(0, size - kept)


def merge_units(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Units that keep both labellings whole: channels go together if either says so.

    A label per channel: channels with the same label go together (a GroupNorm group),
    ``-1`` never goes (pinned), and a unit with a pinned channel is pinned whole. The
    result is relabelled ``0, 1, ...`` in channel order.

    >>> merge_units(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 2, 2, -1])).tolist()
    [-1, -1, -1, -1, -1, -1]
    >>> merge_units(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 0, 1, 1])).tolist()
    [0, 0, 0, 0, 1, 1]
    """
    n = len(a)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for labels in (a, b):
        first: dict[int, int] = {}
        for i, lab in enumerate(labels.tolist()):
            if lab >= 0:
                j = first.setdefault(lab, i)
                parent[find(i)] = find(j)
    pinned = {find(i) for i in range(n) if a[i] < 0 or b[i] < 0}
    out = np.empty(n, dtype=np.int64)
    ids: dict[int, int] = {}
    for i in range(n):
        root = find(i)
        out[i] = -1 if root in pinned else ids.setdefault(root, len(ids))
    return out


def removal_order(
    blocks: int, s: np.ndarray, units: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Channels in the order they go, and the score of each position (non-decreasing).

    A blocked group (a grouped conv's outputs) loses one channel per block at a time:
    the k-th weakest of every block, scored by the mean of those ``blocks`` scores.
    A group with ``units`` (a label per channel, :func:`merge_units`: a GroupNorm's
    groups) loses whole units, weakest first, each scored by the mean of its channels;
    pinned channels (``-1``) come last, scored ``inf``.

    >>> order, pos = removal_order(1, np.array([5.0, 1.0, 0.0, 2.0, 9.0]), np.array([0, 0, 1, 1, -1]))
    >>> order.tolist(), pos.tolist()
    ([2, 3, 0, 1, 4], [1.0, 1.0, 3.0, 3.0, inf])
    """
    if units is not None:
        free = units >= 0
        count = int(units.max(initial=-1)) + 1
        sizes = np.bincount(units[free], minlength=count)
        means = np.bincount(units[free], weights=s[free], minlength=count) / np.maximum(sizes, 1)
        rank = np.empty(count, dtype=np.int64)
        rank[np.argsort(means, kind="stable")] = np.arange(count)
        key = np.where(free, rank[np.where(free, units, 0)], count)  # pinned last
        order = np.argsort(key, kind="stable")
        pos = np.where(free[order], means[np.where(free, units, 0)][order], np.inf)
        return order, pos
    if blocks <= 1:
        order = np.argsort(s, kind="stable")
        return order, s[order]
    rows = s.reshape(blocks, -1)
    row_order = np.argsort(rows, axis=1, kind="stable")
    unit = np.take_along_axis(rows, row_order, axis=1).mean(axis=0)
    offsets = (np.arange(blocks) * rows.shape[1])[:, None]
    order = (row_order + offsets).T.reshape(-1)  # unit 0 of every block, then unit 1, ...
    return order, np.repeat(unit, blocks)


def unit_bounds(units_in_order: np.ndarray, cap: int, round_to: int | None) -> list[int]:
    """Removal counts a unit group may take, ascending, none above ``cap``: the ends of
    its units in removal order (``units[order]``), kept counts multiples of ``round_to``.

    >>> unit_bounds(np.array([1, 1, 0, 0, 2, 2, -1]), cap=5, round_to=None)
    [2, 4]
    >>> unit_bounds(np.array([1, 1, 0, 0, 2, 2, -1]), cap=6, round_to=3)
    [4]
    """
    labels = units_in_order
    size = len(labels)
    ends = [i for i in range(1, size + 1) if i == size or labels[i] != labels[i - 1]]
    step = round_to or 1
    return [e for e in ends if e <= cap and labels[e - 1] >= 0 and (size - e) % step == 0]


def pick_global(groups: Sequence[tuple[int, np.ndarray, list[int]]], want: int) -> dict[int, int]:
    """``{group id: channels removed}``: whole steps, weakest first, at most ``want`` in all.

    Each entry of ``groups`` is ``(gid, position scores, removal bounds)``: the
    scores of :func:`removal_order` and the bounds of :func:`removal_bounds`. A step
    (the channels between two bounds) is scored by the mean of its positions; steps
    are taken in score order (ties in the order given) while they fit. A step that
    would pass ``want`` is skipped, and so are the later steps of its group (a group
    loses a prefix of its order), but a smaller step of another group may still fit.
    With steps of one channel this is exactly "remove the ``want`` lowest".
    """
    gids: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    means: list[np.ndarray] = []
    for gid, pos_scores, bounds in groups:
        if not bounds:
            continue
        b = np.asarray(bounds, dtype=np.int64)
        starts = np.concatenate([[0], b[:-1]])
        sums = np.add.reduceat(pos_scores[: b[-1]].astype(np.float64), starts)
        means.append(sums / (b - starts))
        ends.append(b)
        gids.append(np.full(b.shape, gid, dtype=np.int64))
    if not means or want <= 0:
        return {}
    all_means, all_ends, all_gids = (
        np.concatenate(means),
        np.concatenate(ends),
        np.concatenate(gids),
    )
    order = np.argsort(all_means, kind="stable")
    if all(len(b) == b[-1] for _, _, b in groups if b):  # steps of one channel: the lowest
        taken, counts = np.unique(all_gids[order[:want]], return_counts=True)
        return dict(zip(taken.tolist(), counts.tolist(), strict=True))
    removed: dict[int, int] = {}
    closed: set[int] = set()
    total = 0
    for i in order.tolist():
        gid = int(all_gids[i])
        if gid in closed:
            continue
        end = int(all_ends[i])
        size = end - removed.get(gid, 0)
        if total + size > want:
            closed.add(gid)  # its later steps would leave a gap in its order
            continue
        removed[gid] = end
        total += size
        if total == want:
            break
    return removed
