"""The channel dependency graph: groups, couplings, freezing, untraceable models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.errors import ConfigError, UntraceableModelError
from tests.surgery.nets import SmallNet, Untraceable


def _group(graph: surgery.ChannelGraph, conv: str) -> surgery.Group:
    grp = graph.group_of(conv)
    assert grp is not None
    return grp


def test_resnet_residual_groups() -> None:
    g = surgery.build_graph(torchvision.models.resnet18())
    assert _group(g, "conv1").members == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert _group(g, "layer2.0.downsample.0") is _group(g, "layer2.1.conv2")
    assert _group(g, "layer2.0.conv2").residual
    assert not _group(g, "layer1.0.conv1").residual and _group(g, "layer1.0.conv1").members == [
        "layer1.0.conv1"
    ]
    # every conv group can be pruned; the classifier's outputs are the model's output
    assert [grp.members for grp in g.groups if grp.frozen] == [["fc"]]


def test_mobilenet_depthwise_couples_in_and_out() -> None:
    g = surgery.build_graph(torchvision.models.mobilenet_v2())
    assert _group(g, "features.2.conv.0.0") is _group(
        g, "features.2.conv.1.0"
    )  # expand conv + its depthwise
    assert g.uses["features.2.conv.1.0"].kind == "depthwise"


def test_densenet_concat_offsets() -> None:
    g = surgery.build_graph(torchvision.models.densenet121())
    lay = g.uses["features.denseblock1.denselayer3.conv1"].in_layout
    assert lay is not None and [n for _, n in lay] == [64, 32, 32]
    assert (
        g.uses["classifier"].in_layout is not None
        and sum(n for _, n in g.uses["classifier"].in_layout) == 1024
    )


def test_vgg_flatten_block() -> None:
    g = surgery.build_graph(torchvision.models.vgg11_bn())
    assert g.uses["classifier.0"].in_block == 49


def test_small_net_couplings() -> None:
    g = surgery.build_graph(SmallNet())
    assert _group(g, "stem").members == ["stem", "a"]
    assert g.uses["dw"].kind == "depthwise"
    assert g.uses["gate"].kind == "conv"  # one output channel is not depthwise
    # a grouped conv with in == out couples its input and output channel k (same group)
    assert g.uses["grouped"].kind == "grouped" and _group(g, "e") is _group(g, "grouped")
    assert not _group(g, "grouped").frozen and _group(g, "grouped").blocks == 2


def test_grouped_and_depthwise_after_pruning() -> None:
    model = SmallNet().eval()
    scores = {
        n: np.arange(m.out_channels, dtype=float)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    pruned, plan = surgery.prune(model, scores, ratio=0.5, scope="per-layer")
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == 4 + 3
    assert pruned.e.out_channels == 4  # coupled with the grouped conv it feeds
    assert (pruned.grouped.groups, pruned.grouped.in_channels, pruned.grouped.out_channels) == (
        2,
        4,
        4,
    )
    # each group's rows keep that group's kept inputs (channels 2, 3 | 6, 7)
    w = model.grouped.weight.detach()
    torch.testing.assert_close(pruned.grouped.weight[:2], w[[2, 3]][:, [2, 3]])
    torch.testing.assert_close(pruned.grouped.weight[2:], w[[6, 7]][:, [2, 3]])
    assert pruned.grouped_bn.num_features == 4 and pruned.fc.in_features == 7 + 4
    assert plan.layers["grouped"].keep == [2, 3, 6, 7]  # the 2 weakest of EACH group, not 0..3
    unequal = surgery.Plan(layers={"grouped": surgery.LayerPlan(8, [4, 5, 6, 7])})
    with pytest.raises(ConfigError, match="unequal"):
        surgery.apply(model, unequal)
    assert pruned.gate.out_channels == 1 and pruned.gate.in_channels == 7
    pruned(torch.randn(1, 3, 8, 8))


def test_untraceable_names_module_and_ignore_keeps_it_whole() -> None:
    with pytest.raises(UntraceableModelError, match=r"module 'block' \(_Branchy\).*--ignore"):
        surgery.build_graph(Untraceable())
    model = Untraceable()
    scores = {"stem": np.arange(6.0), "conv": np.arange(4.0), "block.conv": np.arange(4.0)}
    pruned, plan = surgery.prune(model, scores, count=2, ignore=r"^block$")
    assert pruned.stem.out_channels == 4 and pruned.conv.in_channels == 4
    assert pruned.conv.out_channels == 4 and pruned.block.conv.out_channels == 4
    assert any("ignored module block" in n for n in plan.notes)


class _RootBranch(nn.Module):
    """Branches on its input's rank in its own forward (a grayscale batch without channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(self.prepare(x))))
        return self.fc(x.mean((2, 3)))


class _Prepare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x


class _BranchInSubmodule(_RootBranch):
    """The same model with the branch moved into a submodule, as the error advises."""

    def __init__(self) -> None:
        super().__init__()
        self.prep = _Prepare()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.prep(x)


def test_untraceable_root_says_what_works_instead_of_ignore() -> None:
    with pytest.raises(UntraceableModelError) as err:
        surgery.build_graph(_RootBranch())
    message = str(err.value)
    assert message.startswith("torch.fx cannot trace model _RootBranch: ")
    assert "_RootBranch.forward itself, which --ignore cannot keep whole" in message
    assert "matching it to keep it whole" not in message  # no regex makes the root a leaf
    torch.manual_seed(0)
    model = _BranchInSubmodule().eval()
    model.load_state_dict(_RootBranch().state_dict())  # same weights: the advice keeps them
    with torch.no_grad():  # channels 0 and 1 output relu(0): removing them changes nothing
        model.bn.weight[:2] = 0
        model.bn.bias[:2] = 0
    pruned, plan = surgery.prune(model, {"conv": np.arange(6.0)}, count=2, ignore=r"^prep$")
    assert plan.layers["conv"].keep == [2, 3, 4, 5]
    assert pruned.conv.out_channels == 4 and pruned.fc.in_features == 4
    x = torch.randn(4, 8, 8)
    torch.testing.assert_close(pruned.eval()(x), model(x))


def test_ignore_regex_leaves_layers_alone() -> None:
    model = torchvision.models.resnet18()
    scores = {
        n: np.random.default_rng(0).random(m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    pruned, _ = surgery.prune(model, scores, ratio=0.3, ignore=r"^layer1\.")
    assert all(
        m.weight.shape == o.weight.shape
        for (n, m), o in zip(pruned.layer1.named_modules(), model.layer1.modules(), strict=True)
        if isinstance(m, nn.Conv2d)
    )
    assert pruned.layer3[0].conv1.out_channels < 256


class _ViewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_max_pool2d(torch.relu(self.conv(x)), 3)
        return self.fc(y.view(y.size(0), -1))


def test_view_flatten_maps_channel_to_feature_block() -> None:
    model = _ViewNet().eval()
    pruned, _ = surgery.prune(model, {"conv": np.array([1.0, 0.0, 2.0, 3.0])}, count=1)
    keep_cols = [c * 9 + j for c in (0, 2, 3) for j in range(9)]
    torch.testing.assert_close(pruned.fc.weight, model.fc.weight[:, keep_cols], rtol=0, atol=0)
    assert pruned(torch.randn(1, 3, 6, 6)).shape == (1, 2)


class _Shared(nn.Module):
    """One conv applied twice (shared weights) and a conv the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 5, 1)
        self.unused = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.shared(self.a(x))) + torch.relu(self.shared(self.b(x))))


def test_shared_module_couples_its_calls() -> None:
    model = _Shared().eval()
    g = surgery.build_graph(model)
    assert _group(g, "a") is _group(g, "b")  # both feed the same weights
    scores = {"a": np.arange(6.0), "shared": np.arange(5.0), "unused": np.arange(3.0)}
    pruned, plan = surgery.prune(model, scores, ratio=0.4, scope="per-layer")
    assert pruned.a.out_channels == pruned.b.out_channels == pruned.shared.in_channels == 4
    assert pruned.shared.out_channels == 3 and pruned.head.in_channels == 3
    assert any("never calls" in n for n in plan.notes)
    assert pruned(torch.randn(1, 3, 4, 4)).shape == (1, 2, 4, 4)
