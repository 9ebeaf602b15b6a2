"""Selection: global vs per-layer, caps, minimums, rounding, residual groups, plans as data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.errors import ConfigError, RanksError
from tdump.surgery import Plan
from tests.surgery.helpers import random_scores, ranks_frame


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10).eval()


def _convs(m: nn.Module) -> dict[str, int]:
    return {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}


def test_global_count_removes_lowest(resnet: nn.Module) -> None:
    scores = random_scores(resnet)
    scores["layer3.0.conv1"] = np.where(
        np.arange(256) < 40, -1.0, 1.0
    )  # the 40 lowest channels of the model
    _, plan = surgery.prune(resnet, ranks_frame(scores), count=40)
    assert plan.removed == 40 and plan.layers["layer3.0.conv1"].keep == list(range(40, 256))
    assert set(plan.layers) == {"layer3.0.conv1"}


def test_max_ratio_really_caps(resnet: nn.Module) -> None:
    scores = random_scores(resnet)
    scores["layer4.0.conv1"] = np.full(512, -1.0)  # everything in one layer looks worthless
    _, plan = surgery.prune(resnet, scores, count=500, max_ratio=0.25)
    before = _convs(resnet)
    for name, lp in plan.layers.items():
        assert before[name] - len(lp.keep) <= 0.25 * before[name], name
    assert plan.removed == 500 and len(plan.layers["layer4.0.conv1"].keep) == 384
    _, plan = surgery.prune(resnet, scores, count=5000, max_ratio=0.25)
    assert plan.removed < 5000 and all(
        before[n] - len(lp.keep) <= before[n] // 4 for n, lp in plan.layers.items()
    )
    assert any("allow" in n for n in plan.notes)


def test_per_layer_ratio_min_channels_and_round_to(resnet: nn.Module) -> None:
    pruned, _ = surgery.prune(
        resnet, random_scores(resnet), ratio=0.3, scope="per-layer", round_to=8
    )
    for name, c in _convs(pruned).items():
        assert c % 8 == 0 and c >= 0.7 * _convs(resnet)[name] - 1e-9, name
    tiny, _ = surgery.prune(
        resnet, random_scores(resnet), ratio=0.99, scope="per-layer", min_channels=3
    )
    assert min(_convs(tiny).values()) == 3
    tiny(torch.randn(1, 3, 32, 32))


def test_ratio_that_would_empty_a_layer_is_refused(resnet: nn.Module) -> None:
    with pytest.raises(ConfigError, match="empty"):
        surgery.prune(resnet, random_scores(resnet), ratio=1.0)
    with pytest.raises(ConfigError, match="min_channels"):
        surgery.prune(resnet, random_scores(resnet), ratio=0.5, min_channels=0)
    with pytest.raises(ConfigError, match="exactly one"):
        surgery.prune(resnet, random_scores(resnet), ratio=0.5, count=3)


def test_conv_only_groups_leaves_residual_groups(resnet: nn.Module) -> None:
    pruned, plan = surgery.prune(resnet, random_scores(resnet), ratio=0.5, conv_only_groups=True)
    assert pruned.conv1.out_channels == 64 and pruned.layer4[1].conv2.out_channels == 512
    assert pruned.layer1[0].conv1.out_channels < 64
    assert sum("conv_only_groups" in n for n in plan.notes) == 4


def test_residual_group_aggregates_members(resnet: nn.Module) -> None:
    scores = random_scores(resnet)
    members = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    for i, m in enumerate(members):
        scores[m] = np.ones(64)
        scores[m][i] = 0.0  # each member dislikes a different channel; channel 7 is low for all
        scores[m][7] = 0.01
    _, plan = surgery.prune(resnet, {m: scores[m] for m in members}, count=1, aggregate="mean")
    assert 7 not in plan.layers["conv1"].keep
    _, plan = surgery.prune(resnet, {m: scores[m] for m in members}, count=1, aggregate="min")
    assert 0 not in plan.layers["conv1"].keep
    surgery.register_aggregation("second", lambda s: s[1])
    _, plan = surgery.prune(resnet, {m: scores[m] for m in members}, count=1, aggregate="second")
    assert (
        1 not in plan.layers["conv1"].keep
        and plan.layers["conv1"].keep == plan.layers["layer1.1.conv2"].keep
    )


def test_plan_is_data_and_replays(resnet: nn.Module, tmp_path: object) -> None:
    p = surgery.plan(resnet, random_scores(resnet), ratio=0.4)
    again = Plan.from_json(p.to_json())
    assert again == p
    a, p2 = surgery.prune(resnet, random_scores(resnet), ratio=0.4)
    b = surgery.apply(resnet, again)
    assert p2.layers == p.layers
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_ranks_errors(resnet: nn.Module) -> None:
    with pytest.raises(RanksError, match="lacks"):
        surgery.prune(resnet, {"layer9.conv": np.ones(3)}, count=1)
    with pytest.raises(
        RanksError,
        match="65 channels but the checkpoint has 64",
    ):
        surgery.prune(resnet, {"conv1": np.ones(65)}, count=1)
    with pytest.raises(RanksError, match="BatchNorm2d"):
        surgery.prune(resnet, {"bn1": np.ones(64)}, count=1)
    two = ranks_frame({"conv1": np.ones(64)})
    both = two.assign(criterion="l2").pipe(lambda d: __import__("pandas").concat([two, d]))
    with pytest.raises(RanksError, match="--criterion"):
        surgery.prune(resnet, both, count=1)
    assert surgery.prune(resnet, both, count=1, criterion="l2")[0].conv1.out_channels == 63
