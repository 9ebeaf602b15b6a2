"""Selection: global vs per-layer, caps, minimums, rounding, residual groups, plans as data."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.errors import ConfigError, RanksError
from tdump.surgery import Plan, Settings
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
    with pytest.warns(surgery.FewChannelsWarning):
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
    with pytest.raises(ConfigError, match="give only one of count"):
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


def test_settings_object_is_used_as_is(resnet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """``settings=Settings(...)`` selects exactly as the same keywords, with that very object."""
    scores = random_scores(resnet, 5)
    table = ranks_frame(scores)  # a real ranks table, as `tdump rank` writes
    options: dict[str, Any] = {
        "ratio": 0.3,
        "scope": "per-layer",
        "min_channels": 4,
        "max_ratio": 0.5,
        "round_to": 8,
        "normalize": "rms",
        "aggregate": "min",
    }
    settings = Settings(**options)
    by_keywords = surgery.plan(resnet, table, **options)
    seen: list[Settings] = []
    select = surgery.select

    def spy(graph: Any, scores: Any, chosen: Settings) -> Plan:
        seen.append(chosen)
        return select(graph, scores, chosen)

    monkeypatch.setattr(surgery, "select", spy)
    by_settings = surgery.plan(resnet, table, settings=settings)
    pruned, pruned_plan = surgery.prune(resnet, table, settings=settings, criterion="l1")
    assert seen[0] is settings and seen[1] is settings  # not rebuilt, not copied
    assert by_settings.to_dict() == by_keywords.to_dict() and by_settings.removed > 0
    assert by_settings.settings == {**dataclasses.asdict(settings), "max_ratio": 0.5}
    assert pruned_plan.layers == by_keywords.layers
    assert pruned.layer1[0].conv1.out_channels == len(by_keywords.layers["layer1.0.conv1"].keep)
    # the global default cap is resolved in the plan, not written into the Settings
    glob = Settings(count=40)
    assert surgery.plan(resnet, table, settings=glob).to_dict() == (
        surgery.plan(resnet, table, count=40).to_dict()
    )
    assert glob.max_ratio is None


def test_settings_are_checked_when_made_and_not_mixed(resnet: nn.Module) -> None:
    scores = random_scores(resnet)
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        Settings(ratio=1.5)
    with pytest.raises(ConfigError, match=r"^say how much to prune: a fraction .*\(--count 200\)$"):
        Settings()
    with pytest.raises(ConfigError, match="give only one of count"):
        Settings(count=3, ratio=0.3)
    settings = Settings(ratio=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.ratio = 2.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="min_channels must be >= 1"):
        dataclasses.replace(settings, min_channels=0)
    with pytest.raises(ConfigError, match=r"not both \(got scope='per-layer' too\)"):
        surgery.plan(resnet, scores, settings=settings, scope="per-layer")
    with pytest.raises(ConfigError, match="not both"):
        surgery.prune(resnet, scores, settings=settings, ratio=0.3)
    with pytest.raises(ConfigError, match=r"settings must be a tdump\.surgery\.Settings, got dict"):
        surgery.plan(resnet, scores, settings={"ratio": 0.3})  # type: ignore[arg-type]
    # a keyword left at its default (as given or not) is no conflict
    assert surgery.plan(resnet, scores, settings=settings, scope="global").removed > 0


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


def _l1(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        n: m.weight.detach().abs().flatten(1).sum(1).double().numpy()
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def test_global_ratio_is_not_biased_by_width() -> None:
    # Independent check: with each layer divided by its own mean |score|, a channel is
    # removed iff its relative score is below one global threshold; L1 scores of a fresh
    # resnet50 have the same spread in every layer, so every stage loses about `ratio`.
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    scores = _l1(model)
    p = surgery.plan(model, scores, ratio=0.3)
    before = _convs(model)
    stage = {n: n.split(".")[0] if n.startswith("layer") else "stem" for n in before}
    for st in ("layer1", "layer2", "layer3", "layer4"):
        tot = sum(c for n, c in before.items() if stage[n] == st)
        gone = sum(lp.channels - len(lp.keep) for n, lp in p.layers.items() if stage[n] == st)
        assert 0.15 < gone / tot < 0.45, (st, gone, tot)
    assert 0.25 < p.removed_filters / sum(before.values()) < 0.35
    # the old width-biased rule empties the widest stages
    with pytest.warns(surgery.FewChannelsWarning):
        old = surgery.plan(model, scores, ratio=0.3, normalize="l2", max_ratio=1.0)
    l4 = [len(lp.keep) / lp.channels for n, lp in old.layers.items() if n.startswith("layer4")]
    assert min(l4) < 0.05
    # the default cap (0.8) still holds under the old rule
    capped = surgery.plan(model, scores, ratio=0.3, normalize="l2")
    assert all(len(lp.keep) >= 0.2 * lp.channels - 1e-9 for lp in capped.layers.values())


def test_dict_and_table_give_one_plan(resnet: nn.Module) -> None:
    scores = random_scores(resnet, 3)
    scores["layer4.1.conv1"] = scores["layer4.1.conv1"] * 100.0  # a layer on another scale
    a = surgery.plan(resnet, scores, ratio=0.3)
    b = surgery.plan(resnet, ranks_frame(scores), ratio=0.3)
    assert a.layers == b.layers
    # the mean normalisation, computed here with numpy: score / mean(|score|) per layer
    norm = {k: v / np.abs(v).mean() for k, v in scores.items() if k == "layer1.0.conv1"}
    lp = a.layers["layer1.0.conv1"]
    assert set(range(64)) - set(lp.keep) == set(
        np.argsort(norm["layer1.0.conv1"])[: 64 - len(lp.keep)]
    )


def test_few_channels_warns() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    scores = random_scores(model)
    scores["layer4.0.conv1"] = np.r_[np.full(510, 1e-6), [1.0, 1.0]]
    with pytest.warns(surgery.FewChannelsWarning, match=r"layer4\.0\.conv1 512 -> 2"):
        p = surgery.plan(model, scores, count=600, max_ratio=1.0)
    assert any("fewer than 4" in n for n in p.notes)


def test_two_criteria_file_and_directory(resnet: nn.Module, tmp_path: object) -> None:
    import pandas as pd

    from tdump.analyze import read_ranks, write_ranks

    one = ranks_frame({"conv1": np.arange(64.0)})
    two = pd.concat([one, one.assign(criterion="l2", score=-one["score"])], ignore_index=True)
    path = f"{tmp_path}/two.parquet"
    write_ranks(two, path)
    assert len(read_ranks(path)) == 128
    with pytest.raises(RanksError, match="--criterion"):
        surgery.plan(resnet, path, count=4)
    assert surgery.plan(resnet, path, count=4, criterion="l1").layers["conv1"].keep[0] == 4
    assert surgery.plan(resnet, path, count=4, criterion="l2").layers["conv1"].keep[-1] == 59
    with pytest.raises(RanksError, match="is a directory"):
        surgery.plan(resnet, str(tmp_path), count=4)


def test_groups_without_ranks_are_said(resnet: nn.Module) -> None:
    """A group with no ranks keeps its channels; a group ranked by some members follows them."""
    scores = random_scores(resnet)
    del scores["layer1.0.conv1"]  # a group of its own: nothing decides for it
    del scores["layer2.0.downsample.0"]  # coupled by the addition to layer2.0.conv2, layer2.1.conv2
    small, plan = surgery.prune(resnet, scores, ratio=0.3)
    said = " ".join(plan.notes)
    assert "1 prunable group(s) have no ranks and keep all their channels (layer1.0.conv1)" in said
    assert "e.g. layer2.0.downsample.0 (no ranks) follows layer2.0.conv2" in said
    assert _convs(small)["layer1.0.conv1"] == 64
    assert _convs(small)["layer2.0.downsample.0"] == _convs(small)["layer2.0.conv2"] < 128
