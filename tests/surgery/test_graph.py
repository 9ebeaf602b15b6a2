"""The channel dependency graph: groups, couplings, freezing, untraceable models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.errors import ConfigError, UntraceableModelError
from tests.surgery import zoo
from tests.surgery.nets import (
    BranchInSubmodule,
    IterShape,
    PadToSkip,
    RootBranch,
    SmallNet,
    Untraceable,
    ValueBranch,
)


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


def _zero_first_channels(*convs: nn.Module) -> None:
    """Channels 0 and 1 of ``convs`` output zeros: removing them changes nothing downstream."""
    with torch.no_grad():
        for conv in convs:
            conv.weight[:2] = 0
            conv.bias[:2] = 0


def test_untraceable_root_says_what_works_instead_of_ignore() -> None:
    with pytest.raises(UntraceableModelError) as err:
        surgery.build_graph(RootBranch())
    message = str(err.value)
    assert message.startswith("torch.fx cannot trace model RootBranch: ")
    assert "RootBranch.forward itself, which --ignore cannot keep whole" in message
    assert "matching it to keep it whole" not in message  # no regex makes the root a leaf
    assert "traces when the input shape is known (--input-shape C,H,W" in message
    torch.manual_seed(0)
    model = BranchInSubmodule().eval()
    model.load_state_dict(RootBranch().state_dict())  # same weights: the advice keeps them
    _zero_first_channels(model.conv)
    pruned, plan = surgery.prune(model, {"conv": np.arange(6.0)}, count=2, ignore=r"^prep$")
    assert plan.layers["conv"].keep == [2, 3, 4, 5]
    assert pruned.conv.out_channels == 4 and pruned.fc.in_features == 4
    x = torch.randn(4, 8, 8)
    torch.testing.assert_close(pruned.eval()(x), model(x))


def test_shape_branches_trace_at_the_input_shape(tmp_path) -> None:
    """A forward branching on shapes prunes as it is, given its input shape; rounds keep it."""
    torch.manual_seed(0)
    model = RootBranch().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.build_graph(model, input_shape=(8, 8))  # runs its forward on fake tensors only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN untouched
    model.eval()
    _zero_first_channels(model.conv)
    pruned, plan = surgery.prune(model, {"conv": np.arange(6.0)}, count=2, input_shape=(8, 8))
    assert plan.layers["conv"].keep == [2, 3, 4, 5]
    assert any("traced at input shape 8x8: RootBranch's forward branches" in n for n in plan.notes)
    x = torch.randn(4, 8, 8)
    torch.testing.assert_close(pruned.eval()(x), model(x))
    path = tmp_path / "p.pt"
    surgery.save(path, pruned, arch="tests.surgery.nets.RootBranch")
    assert torch.load(path, weights_only=True)["input_shape"] == [8, 8]
    again = surgery.load(path, arch=RootBranch).eval()
    assert surgery.provenance(again).input_shape == (8, 8)
    torch.testing.assert_close(again(x), model(x))
    # round 2 from the loaded model: no shape given, the checkpoint's is used
    smaller, plan2 = surgery.prune(again, {"conv": np.arange(4.0)}, count=1)
    assert smaller.conv.out_channels == 3 and plan2.layers["conv"].channels == 4
    assert smaller.eval()(x).shape == (4, 2)


def test_shape_branch_between_coupled_convs() -> None:
    """A U-Net step (pad when sizes differ) inside a residual group: the add still couples."""
    torch.manual_seed(0)
    model = PadToSkip().eval()
    with pytest.raises(UntraceableModelError, match="traces when the input shape is known"):
        surgery.build_graph(model)
    _zero_first_channels(model.a, model.b)
    scores = {"a": np.arange(4.0), "b": np.arange(4.0)}
    pruned, plan = surgery.prune(model, scores, count=2, input_shape=(3, 9, 9))
    assert plan.layers["a"].keep == plan.layers["b"].keep == [2, 3]
    assert pruned.head.in_channels == 2
    x = torch.randn(2, 3, 9, 9)  # 9 -> 4 -> 8: resized to 9, the traced path
    torch.testing.assert_close(pruned.eval()(x), model(x))


def test_iteration_over_a_shape_traces_at_the_input_shape() -> None:
    torch.manual_seed(0)
    model = IterShape().eval()
    with pytest.raises(UntraceableModelError):
        surgery.build_graph(model)
    _zero_first_channels(model.conv)
    pruned, plan = surgery.prune(model, {"conv": np.arange(4.0)}, count=2, input_shape=(3, 4, 4))
    assert plan.layers["conv"].keep == [2, 3] and pruned.head.in_channels == 2
    x = torch.randn(2, 3, 4, 4)  # resized to 8x8: the traced path
    torch.testing.assert_close(pruned.eval()(x), model(x))


def test_value_branches_are_refused_even_with_a_shape() -> None:
    with pytest.raises(UntraceableModelError) as err:
        surgery.build_graph(ValueBranch(), input_shape=(3, 8, 8))
    message = str(err.value)
    assert "tracing at input shape 3x8x8 failed too" in message
    assert "ValueBranch.forward itself" in message


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


class _Squeezes(nn.Module):
    """A pooled map squeezed before the classifier, one of the ways scripts write it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.fc, self.how = nn.Conv2d(3, 8, 3), nn.Linear(8, 2), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_avg_pool2d(self.conv(x), 1)
        if self.how == "-1 -1":
            y = y.squeeze(-1).squeeze(-1)
        elif self.how == "(2, 3)":
            y = torch.squeeze(y, (2, 3))
        elif self.how == "3 2":
            y = y.squeeze(3).squeeze(2)
        elif self.how == "all":
            y = y.squeeze()  # a batch of one would lose its batch axis too
        else:
            y = y.squeeze(1).squeeze(-1)  # the channels' axis
        return self.fc(y)


@pytest.mark.parametrize("how", ["-1 -1", "(2, 3)", "3 2", "all", "1 -1"])
def test_squeezes_after_the_channels_keep_them(how: str) -> None:
    model = _Squeezes(how).double().eval()
    frozen = surgery.build_graph(model).group_of("conv").frozen  # type: ignore[union-attr]
    assert frozen == (how in ("all", "1 -1"))
    if not frozen:
        pruned, plan = surgery.prune(model, {"conv": np.arange(8.0)}, count=3)
        assert pruned.fc.in_features == 5
        zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 7, 7, dtype=torch.float64))


def test_a_squeeze_excitation_of_linears_scales_the_channels_it_read() -> None:
    """SE with Linears: ``x * fc2(...).unsqueeze(-1).unsqueeze(-1)`` couples fc2 to the conv."""

    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
            self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            w = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
            return self.out(y * w.unsqueeze(-1).unsqueeze(-1))

    torch.manual_seed(0)
    model = SE().double().eval()
    groups = {tuple(g.members): g.frozen for g in surgery.build_graph(model).groups}
    assert groups == {("conv", "fc2"): False, ("fc1",): False, ("out",): True}
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3)
    assert pruned.fc2.out_features == pruned.conv.out_channels < 8
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 7, 7, dtype=torch.float64))
