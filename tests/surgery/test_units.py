"""Removal steps: grouped convs and round_to, chosen as whole steps in a global selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.surgery._units import (
    merge_units,
    pick_global,
    removal_bounds,
    removal_order,
    unit_bounds,
)
from tests.surgery.helpers import random_scores


def test_bounds_keep_multiples_and_caps() -> None:
    for size, blocks, cap, round_to in [
        (64, 1, 51, 8),
        (100, 1, 80, 8),
        (400, 25, 320, 8),
        (96, 4, 90, None),
    ]:
        bounds = removal_bounds(size, blocks, cap, round_to)
        kept = [size - b for b in bounds]
        assert all(k % blocks == 0 and k % (round_to or 1) == 0 for k in kept), (size, bounds)
        assert all(0 < b <= cap for b in bounds)
        # every allowed removal up to the cap is there, found by brute force
        want = [r for r in range(1, cap + 1) if (size - r) % np.lcm(blocks, round_to or 1) == 0]
        assert bounds == want


def test_one_channel_steps_take_the_lowest() -> None:
    """With steps of one channel the global pick is "the n lowest under each cap" (numpy check)."""
    rng = np.random.default_rng(3)
    groups, pool = [], []
    for gid, (size, cap) in enumerate([(16, 12), (40, 30), (7, 2), (64, 51)]):
        _, pos = removal_order(1, rng.random(size))
        groups.append((gid, pos, removal_bounds(size, 1, cap, None)))
        pool += [(v, gid) for v in pos[:cap]]
    # a group of two-channel steps scored above all others: same answer, by the step loop
    strong = (9, np.full(8, 2.0), [2, 4, 6])
    for want in (0, 1, 17, 60, 95, 500):
        got = pick_global(groups, want)
        lowest = sorted(pool)[:want]
        expect = {g: sum(1 for _, h in lowest if h == g) for g in {h for _, h in lowest}}
        assert got == expect, want
        if want <= len(pool):
            assert pick_global([*groups, strong], want) == expect, want


def test_a_step_too_big_is_skipped_for_one_that_fits() -> None:
    weak_but_big = (0, np.zeros(8), [4, 8])  # its first step is 4 channels
    stronger = (1, np.array([1.0, 2.0, 3.0, 4.0]), [1, 2, 3])
    assert pick_global([weak_but_big, stronger], 3) == {1: 3}
    assert pick_global([weak_but_big, stronger], 5) == {0: 4, 1: 1}
    # a group whose step was skipped loses nothing more (its order is a prefix)
    assert pick_global([(0, np.array([0.0, 5.0, 5.0]), [1, 3]), stronger], 2) == {0: 1, 1: 1}


@pytest.mark.parametrize("name", ["regnet_x_400mf", "resnext50_32x4d"])
def test_global_round_to_on_grouped_convs_reaches_the_count(name: str) -> None:
    """Every kept count a multiple of 8, groups equal, and within one step of 8 of the count."""
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    small, plan = surgery.prune(model, random_scores(model, 2), count=700, round_to=8)
    assert 692 < plan.removed <= 700, plan.notes
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert all(c.in_channels % c.groups == 0 and c.out_channels % c.groups == 0 for c in convs)
    before = sum(c.out_channels for c in model.modules() if isinstance(c, nn.Conv2d))
    after = sum(c.out_channels for c in convs)
    assert after < before
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _components(a: np.ndarray, b: np.ndarray) -> list[frozenset[int]]:
    """Connected components of 'same label in a or in b', by breadth-first search."""
    n, seen, out = len(a), set(), []
    for start in range(n):
        if start in seen:
            continue
        comp, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in range(n):
                linked = (a[i] >= 0 and a[i] == a[j]) or (b[i] >= 0 and b[i] == b[j])
                if j not in comp and linked:
                    comp.add(j)
                    todo.append(j)
        seen |= comp
        out.append(frozenset(comp))
    return out


def test_merge_units_gives_the_components_of_both_labellings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 24))
        a, b = rng.integers(-1, 6, n), rng.integers(-1, 6, n)
        merged = merge_units(a, b)
        for comp in _components(a, b):
            labels = {int(merged[i]) for i in comp}
            assert len(labels) == 1  # a component goes whole
            pinned = any(a[i] < 0 or b[i] < 0 for i in comp)
            assert (labels == {-1}) == pinned  # and is pinned if any channel is
        free = merged[merged >= 0]
        assert sorted(set(free.tolist())) == list(range(len(set(free.tolist()))))


def test_unit_removal_order_and_bounds_take_the_weakest_units_whole() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 20))
        units = merge_units(*(rng.integers(-1, 5, n),) * 2)
        s = rng.random(n)
        order, pos = removal_order(1, s, units)
        assert sorted(order.tolist()) == list(range(n)) and np.all(pos[:-1] <= pos[1:])
        for end in unit_bounds(units[order], cap=n, round_to=None):
            gone = set(order[:end].tolist())
            for u in set(units.tolist()) - {-1}:
                members = set(np.flatnonzero(units == u).tolist())
                assert members <= gone or not members & gone  # whole units only
            assert not any(units[i] < 0 for i in gone)  # pinned never go
            # the units gone are the weakest by mean score (numpy on the same data)
            means = {u: s[units == u].mean() for u in set(units.tolist()) - {-1}}
            taken = {int(units[i]) for i in gone}
            assert all(means[u] <= means[v] + 1e-12 for u in taken for v in set(means) - taken)
