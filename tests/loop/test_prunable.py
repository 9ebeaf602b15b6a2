"""The loop's ``prunable`` count: what one ``tdump prune`` with the round's ranks can remove."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

import tdump.surgery as surgery
from tdump.errors import RanksError
from tdump.loop._metrics import left_alone, prunable_counts, pruned_with, rankable_layers
from tdump.loop._settings import LoopSettings, record_options
from tests.loop.conftest import SCRIPTS, TRAIN, run_tdump
from tests.surgery.helpers import random_scores, write_ranks

#: More channels than any of these models has: the plan removes all it may.
HUGE = 10**6

SETTINGS: list[dict[str, Any]] = [
    {},  # tdump prune's defaults: global, --max-ratio 0.8
    {"max_ratio": 0.5, "min_channels": 8},
    {"scope": "per-layer"},
    {"scope": "per-layer", "max_ratio": 0.25},
    {"conv_only_groups": True},
]


def prunable_channels(model: torch.nn.Module, ranks: Any, **settings: Any) -> int:
    """The loop's ``prunable``: the first number of :func:`prunable_counts`."""
    return prunable_counts(model, ranks, **settings)[0]


def _all_groups_cap(model: torch.nn.Module, settings: dict[str, Any]) -> int:
    """The count before it looked at the ranks: every prunable group's cap, ranked or not."""
    from tdump.surgery._plan import group_cap, resolve_max_ratio

    max_ratio = resolve_max_ratio(settings.get("max_ratio"), settings.get("scope", "global"))
    return sum(
        group_cap(grp, settings.get("min_channels", 1), max_ratio)
        for grp in surgery.build_graph(model).groups
        if not (grp.frozen or (settings.get("conv_only_groups") and grp.residual))
    )


@pytest.fixture(scope="module")
def partly_ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real tdump checkpoint of a ResNet-18 and a real ranks file of some of its convs.

    Ranked: the stem and layer1 (whose residual group they share), layer2's first
    block without its downsample (a residual group ranked by some members), layer3.0's
    conv1; layer3's other convs and all of layer4 have no ranks (not recorded).
    """
    tmp = tmp_path_factory.mktemp("prunable")
    torch.manual_seed(0)
    ckpt = tmp / "checkpoint.pt"
    surgery.save(
        ckpt, torchvision.models.resnet18(num_classes=10), arch="torchvision.models.resnet18"
    )
    model = surgery.load(ckpt)
    scores = random_scores(model)
    kept = ("conv1", "layer1.", "layer2.0.conv", "layer3.0.conv1")
    ranked = {k: v for k, v in scores.items() if k.startswith(kept)}
    assert 0 < len(ranked) < len(scores)
    return ckpt, write_ranks(tmp / "ranks.parquet", ranked)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: json.dumps(s) if s else "defaults")
def test_prunable_is_what_the_surgery_removes_with_those_ranks(
    partly_ranked: tuple[Path, Path], settings: dict[str, Any]
) -> None:
    ckpt, ranks = partly_ranked
    model = surgery.load(ckpt)
    prunable = prunable_channels(model, ranks, **settings)
    total, one_group = prunable_counts(model, ranks, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", surgery.FewChannelsWarning)
        plan = surgery.plan(model, ranks, count=HUGE, **settings)
        pruned, applied = surgery.prune(model, ranks, count=HUGE, **settings)
    assert prunable == plan.removed > 0
    # ... the channels actually gone from the pruned model, each group counted once
    before = dict(model.named_modules())
    after = dict(pruned.named_modules())
    gone_per_group = [
        before[g[0]].out_channels - after[g[0]].out_channels  # type: ignore[operator]
        for g in applied.groups
    ]
    assert sum(gone_per_group) == prunable == total
    assert applied.removed_per_group == gone_per_group
    # ... and the most one group lost: what a per-layer --count asks of every group
    assert one_group == max(gone_per_group) > 0
    # unranked groups (layer4, most of layer3) are not counted: the old number was larger
    assert prunable < _all_groups_cap(model, settings)
    # the layer names alone give the same count (how the loop asks, before ranking)
    names = surgery.read_ranks_table(ranks)["layer"].unique().tolist()
    assert prunable_channels(model, names, **settings) == prunable


def test_prunable_numbers_of_the_partly_ranked_resnet(partly_ranked: tuple[Path, Path]) -> None:
    """The numbers the report quotes: tdump prune's defaults, ranks of some convs."""
    ckpt, ranks = partly_ranked
    model = surgery.load(ckpt)
    assert _all_groups_cap(model, {}) == 2298  # every group's cap, as before
    assert prunable_channels(model, ranks) == 561  # what tdump prune can remove


def test_prunable_strips_a_wrappers_prefix_and_is_zero_without_prunable_ranks(
    partly_ranked: tuple[Path, Path],
) -> None:
    ckpt, ranks = partly_ranked
    model = surgery.load(ckpt)
    names = surgery.read_ranks_table(ranks)["layer"].unique().tolist()
    expected = prunable_channels(model, ranks)
    # a LightningModule's dump names model.conv1; tdump prune strips the prefix
    assert prunable_channels(model, [f"model.{n}" for n in names]) == expected
    assert prunable_channels(model, []) == 0  # nothing ranked: tdump prune refuses
    assert prunable_channels(model, {"fc": np.ones(10)}) == 0  # the head is frozen


def test_rankable_layers_are_those_the_rank_stage_scores(tmp_path: Path) -> None:
    """A dump of TinyNet that records only relu1's Taylor term: the rank stage scores
    conv1 alone, so one round can prune 12 of its 16 channels, not 24 (conv2's too)."""
    from tdump.analyze import read_ranks

    settings = LoopSettings(script=TRAIN, include=r"(?:^|\.)relu1")
    include, config = record_options(settings)
    dump, ranks = tmp_path / "dump.zarr", tmp_path / "ranks.parquet"
    env = {
        "PYTHONPATH": str(SCRIPTS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TDUMP_OUT": str(tmp_path / "model.pt"),
    }
    argv = ["--out", str(dump), "--interval", "2", "--include", str(include)]
    proc = run_tdump("record", *argv, "--config", json.dumps(config), TRAIN, env=env)
    assert proc.returncode == 0, proc.stderr
    assert rankable_layers(dump, "taylor") == ["conv1"]
    proc = run_tdump("rank", str(dump), "-o", str(ranks), "--scheduler", "sync", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(read_ranks(ranks)["layer"].unique()) == ["conv1"]  # as predicted

    import sys

    sys.path.insert(0, str(SCRIPTS))
    try:
        from tinynet import TinyNet
    finally:
        sys.path.remove(str(SCRIPTS))
    model = TinyNet()
    assert prunable_channels(model, ["conv1"]) == prunable_channels(model, ranks) == 12
    assert _all_groups_cap(model, {}) == 24
    # l1 reads weights, which this dump did not record; bn-gamma likewise: no ranking
    assert rankable_layers(dump, "l1") is None
    assert rankable_layers(tmp_path / "missing.zarr", "taylor") is None


def test_left_alone_is_what_pruning_never_touches_even_with_scores() -> None:
    """A ViT's conv_proj and head are left alone; its MLP's first Linear is not. Checked
    against the surgery itself: scores for every listed layer remove nothing from them."""
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    frozen = left_alone(surgery.build_graph(vit))
    assert set(frozen) == {"conv_proj", "encoder.layers.encoder_layer_0.mlp.3", "heads.head"}
    assert frozen["conv_proj"].startswith("torch.cat (dim 1) with a tensor of untracked channels")
    mlp = "encoder.layers.encoder_layer_0.mlp.0"
    ranks = {name: np.arange(float(w)) for name, w in [("conv_proj", 16), (mlp, 32)]}
    plan = surgery.plan(vit, ranks, count=8)
    assert "conv_proj" not in plan.layers and len(plan.layers[mlp].keep) == 24
    with pytest.raises(RanksError, match="no ranked layer can be pruned"):
        surgery.plan(vit, {"conv_proj": np.arange(16.0)}, count=8)


def test_pruned_with_names_what_the_surgery_prunes_alike() -> None:
    """A ResNet's downsample convs have no Taylor score; pruned_with maps each to the
    scored convs it shares channels with. Checked against the surgery itself: with
    ranks for every other conv, each listed layer keeps exactly its partners' channels,
    and fewer than it had. The frozen fc is left_alone's, not listed here."""
    net = torchvision.models.resnet18(num_classes=4)
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    scored = [c for c in convs if "downsample" not in c]
    shared = pruned_with(surgery.build_graph(net), scored)
    assert sorted(shared) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    rng = np.random.default_rng(0)
    widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    ranks = {c: rng.random(widths[c]) for c in scored}
    plan = surgery.plan(net, ranks, ratio=0.3)
    for layer, partners in shared.items():
        keep = plan.layers[layer].keep
        assert len(keep) < widths[layer]
        for partner in partners:
            assert list(plan.layers[partner].keep) == list(keep), (layer, partner)
    # a DDP-style prefix on the ranked names still matches the model's own
    prefixed = pruned_with(surgery.build_graph(net), [f"module.{c}" for c in scored])
    assert prefixed == shared


def test_with_conv_only_groups_residual_groups_are_left_alone() -> None:
    """--conv-only-groups keeps residual groups whole: their downsample convs are not
    pruned with anything then, so left_alone lists them (why: that option) and
    pruned_with does not. Checked against the surgery with the same setting."""
    net = torchvision.models.resnet18(num_classes=4)
    graph = surgery.build_graph(net)
    widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    scored = [c for c in widths if "downsample" not in c]
    assert pruned_with(graph, scored, conv_only_groups=True) == {}
    frozen = left_alone(graph, conv_only_groups=True)
    assert (
        "--conv-only-groups" in frozen["layer2.0.downsample.0"] and "layer1.0.conv1" not in frozen
    )
    assert "layer2.0.downsample.0" not in left_alone(graph)
    rng = np.random.default_rng(0)
    plan = surgery.plan(
        net, {c: rng.random(widths[c]) for c in scored}, ratio=0.3, conv_only_groups=True
    )
    for layer in frozen:
        assert layer not in plan.layers, layer  # nothing left_alone names loses a channel
    assert any(layer in plan.layers for layer in scored if layer not in frozen)
