"""GroupNorm prunes by whole groups: a group's statistics stay those of the channels
it keeps only when its channels go together.

Equivalence is checked independently of the channel graph (``zoo.zeroed_reference``:
removed channels become NaN in the unpruned model, and a GroupNorm group with one NaN
channel turns all of its channels NaN, so removing part of a group cannot pass).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tdump.surgery as surgery
from tdump.errors import ConfigError
from tests.surgery import zoo
from tests.surgery.nets import GroupNormNet, TinyDiffusion


def _unit_size(units: np.ndarray | None) -> int:
    """The one size of ``units``' free units (1 without units)."""
    if units is None:
        return 1
    sizes = set(np.bincount(units[units >= 0]).tolist()) - {0}
    assert len(sizes) <= 1, sizes
    return sizes.pop() if sizes else 0


def _groups(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """``{first member: (size, unit size, frozen)}`` of every group of ``model``'s graph."""
    return {
        g.members[0]: (g.size, _unit_size(g.units), g.frozen)
        for g in surgery.build_graph(model).groups
    }


def _group_norms(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (m.num_groups, m.num_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.GroupNorm)
    }


def test_group_norm_channels_go_in_whole_groups() -> None:
    groups = _groups(GroupNormNet())
    # stem and b share channels through the residual: runs of 4 (gn0) and 8 (gn_b) -> 8
    assert groups["stem"] == (16, 8, False)
    assert groups["a"] == (16, 2, False)
    # one GroupNorm over cat([left, right]): runs of 4 that never straddle the two
    assert groups["left"] == (12, 4, False) and groups["right"] == (8, 4, False)
    assert groups["one"] == (8, 8, True)  # a one-group GroupNorm: no removal is exact
    assert groups["last"] == (12, 1, False)  # num_groups == num_channels: per channel


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_net_prunes_saves_loads_and_prunes_again(affine: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GroupNormNet(affine=affine).double().eval()
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3)
    assert {"a", "left", "last"} <= set(plan.layers)
    for name, (groups, channels) in _group_norms(pruned).items():
        num_groups, num_channels = _group_norms(model)[name]
        # the channels per group stay; only whole groups went
        assert channels * num_groups == num_channels * groups, name
    assert pruned.gn_a.num_channels == pruned.a.out_channels < 16
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x)

    path = tmp_path / "gn.pt"
    surgery.save(
        path, pruned, arch="tests.surgery.nets.GroupNormNet", arch_kwargs={"affine": affine}
    )
    back = surgery.load(path, arch=GroupNormNet).eval().double()
    assert _group_norms(back) == _group_norms(pruned)
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)

    again, plan2 = surgery.prune(back, zoo.l1_scores(back), ratio=0.3)
    assert surgery.count_params(again) < surgery.count_params(back)
    zoo.assert_equivalent(back, again, plan2, x)
    zoo._train_step(again, x)


def test_per_layer_removal_rounds_down_to_whole_groups() -> None:
    model = GroupNormNet()
    scores = zoo.l1_scores(model)
    p = surgery.plan(model, scores, count=3, scope="per-layer", min_channels=1)
    gone = {n: lp.channels - len(lp.keep) for n, lp in p.layers.items()}
    assert gone["a"] == 2 and gone["last"] == 3  # runs of 2; per channel
    assert "left" not in gone  # runs of 4: 3 rounds down to none
    assert any("go only in whole groups" in n for n in p.notes)


def test_the_weakest_groups_go_by_their_mean_score() -> None:
    model = GroupNormNet()
    scores = zoo.l1_scores(model)
    # runs of 2 in a: scores 0..15 reversed in pairs -> the last two pairs are weakest
    scores["a"] = np.array([9.0, 0.0] + [5.0] * 12 + [1.0, 2.0])
    p = surgery.plan(model, scores, count=4, scope="per-layer")
    kept = set(p.layers["a"].keep)
    assert {0, 1, 14, 15}.isdisjoint(kept) and len(kept) == 12  # means 4.5 and 1.5


def test_a_plan_that_splits_a_group_is_refused() -> None:
    model = GroupNormNet()
    p = surgery.Plan({"a": surgery.LayerPlan(16, list(range(1, 16)))}, [["a"]])
    with pytest.raises(ConfigError, match=r"part of a GroupNorm group in 'a'"):
        surgery.apply(model, p)


class _Straddles(nn.Module):
    """A GroupNorm over cat([a (6), b (10)]) in runs of 4: channels 4..7 mix a's and b's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
        self.gn, self.head = nn.GroupNorm(4, 16), nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gn(torch.cat([self.a(x), self.b(x)], 1)))


def test_a_group_spanning_two_layers_keeps_its_channels_in_both() -> None:
    torch.manual_seed(0)
    model = _Straddles().double().eval()
    graph = surgery.build_graph(model)
    units = {m: g.units for g in graph.groups for m in g.members}
    assert units["a"] is not None and units["b"] is not None
    assert units["a"].tolist() == [0, 0, 0, 0, -1, -1]  # its part of run 1 stays
    assert units["b"].tolist() == [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert graph.notes == [
        "gn's groups of 4 span channels of different layers (6 + 10): the 4 channels in "
        "those groups stay (a num_groups whose group size divides each part frees them)"
    ]
    scores = {
        "a": np.array([1.0, 1, 1, 1, 5, 5]),
        "b": np.array([5.0, 5, 5, 5, 5, 5, 1, 1, 1, 1]),
        "head": np.ones(2),
    }
    pruned, plan = surgery.prune(model, scores, count=8, max_ratio=0.9)
    assert plan.layers["a"].keep == [4, 5] and plan.layers["b"].keep == [0, 1, 2, 3, 4, 5]
    assert pruned.gn.num_groups == 2 and pruned.gn.num_channels == 8
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_group_norm_freezes_what_it_cannot_keep_whole() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1, groups=4)  # equal removals per block
            self.gn = nn.GroupNorm(2, 8)  # ... or whole runs of 4: not both
            self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gn(self.a(self.stem(x))))

    class Spanned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 6, 1)
            self.gn, self.head = nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)  # a inside run 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gn(torch.cat([self.a(x), self.b(x)], 1)))

    reasons = {m: g.reason for g in surgery.build_graph(Grouped()).groups for m in g.members}
    assert (
        reasons["stem"]
        == "a grouped conv and a GroupNorm or pixel_shuffle share these channels (gn)"
    )
    first = nn.Sequential(  # the GroupNorm before the grouped conv: the same check
        nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.Conv2d(8, 2, 1),
    )  # fmt: skip
    reasons = {m: g.reason for g in surgery.build_graph(first).groups for m in g.members}
    assert (
        reasons["0"] == "a grouped conv and a GroupNorm or pixel_shuffle share these channels (2)"
    )
    reasons = {m: g.reason for g in surgery.build_graph(Spanned()).groups for m in g.members}
    assert reasons["a"] == "GroupNorm groups that span other layers' channels hold them all (gn)"
    assert reasons["b"] == ""  # its run 1 may still go


def test_a_diffusion_denoiser_prunes_around_what_it_must_keep() -> None:
    torch.manual_seed(0)
    model = TinyDiffusion().double().eval()
    graph = surgery.build_graph(model)
    assert {m for g in graph.groups if g.frozen for m in g.members} == {"out"}
    # the decoder's GroupNorm over cat([mid (32), d1 (16)]) has runs of 12: the run across
    # the two keeps its channels (8 of mid's, 4 of d1's), the others may go
    assert any("groups of 12 span channels of different layers (32 + 16)" in n for n in graph.notes)
    mid = graph.group_of("mid.conv2")
    assert mid is not None and mid.units is not None and int((mid.units < 0).sum()) == 8
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3)
    assert any("span channels of different layers" in n for n in plan.notes)
    # the time embedding's Linear is added to conv1's channels: they go together
    assert pruned.d1.temb.out_features == pruned.d1.conv1.out_channels < 16
    x, t = torch.randn(2, 1, 10, 10, dtype=torch.float64), torch.tensor([0.1, 0.9]).double()
    zoo.assert_equivalent(model, pruned, plan, x, t)
