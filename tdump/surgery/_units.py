"""Which channel counts a group may lose, and the global choice over whole steps.

A group's removal is constrained twice: a grouped conv loses the same number of
channels from every block (so removals are multiples of ``blocks``; a GroupNorm's
channels go in whole groups, runs of ``chunk``, and ``blocks`` below stands for
either), and
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

__all__ = ["kept_multiple", "pick_global", "removal_bounds", "removal_order", "round_removal"]


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


def removal_order(blocks: int, s: np.ndarray, chunk: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Channels in the order they go, and the score of each position (non-decreasing).

    A blocked group (a grouped conv's outputs) loses one channel per block at a time:
    the k-th weakest of every block, scored by the mean of those ``blocks`` scores.
    A chunked group (a GroupNorm's channels) loses whole runs of ``chunk`` channels,
    weakest run first, each scored by the mean of its channels.

    >>> order, pos = removal_order(1, np.array([5.0, 1.0, 0.0, 2.0]), chunk=2)
    >>> order.tolist(), pos.tolist()
    ([2, 3, 0, 1], [1.0, 1.0, 3.0, 3.0])
    """
    if chunk > 1:
        runs = s.reshape(-1, chunk).mean(axis=1)
        run_order = np.argsort(runs, kind="stable")
        order = (run_order[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)
        return order, np.repeat(runs[run_order], chunk)
    if blocks <= 1:
        order = np.argsort(s, kind="stable")
        return order, s[order]
    rows = s.reshape(blocks, -1)
    row_order = np.argsort(rows, axis=1, kind="stable")
    unit = np.take_along_axis(rows, row_order, axis=1).mean(axis=0)
    offsets = (np.arange(blocks) * rows.shape[1])[:, None]
    order = (row_order + offsets).T.reshape(-1)  # unit 0 of every block, then unit 1, ...
    return order, np.repeat(unit, blocks)


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
