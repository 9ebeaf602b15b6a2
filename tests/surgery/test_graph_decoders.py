"""Decoders prune: padding and crops that spare the channels, transposed convs, a U-Net,
instance norms (fast neural style).

Equivalence is checked independently of the channel graph (``zoo.zeroed_reference``:
the unpruned model with the removed channels computed away by forward hooks), in
float64, at an odd input size so that the U-Net's padding is not zero.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tdump.surgery as surgery
from tests.surgery import zoo
from tests.surgery.nets import Crops, IdaUp, PadsChannels, StyleNet, UNet


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_prunes_through_padding_concatenation_and_upsampling(bilinear: bool) -> None:
    torch.manual_seed(0)
    model = UNet(bilinear).double().eval()
    graph = surgery.build_graph(model)
    frozen = {m: g.reason for g in graph.groups if g.frozen for m in g.members}
    assert frozen == {"outc": "reaches the model output"}  # nothing else is left alone
    pruned, plan = zoo.l1_prune(model)
    if not bilinear:  # the transposed convs lose outputs and inputs
        assert "up1.up" in plan.layers
        assert pruned.up1.up.in_channels < 32 and pruned.up1.up.out_channels < 16
    assert surgery.count_params(pruned) < 0.65 * surgery.count_params(model)
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 22, 19, dtype=torch.float64))
    zoo._train_step(pruned, torch.randn(2, 3, 13, 13, dtype=torch.float64))


def test_transposed_unet_saves_loads_and_prunes_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet().eval()
    pruned, _ = zoo.l1_prune(model)
    path = tmp_path / "unet.pt"
    surgery.save(path, pruned, arch="tests.surgery.nets.UNet")
    back = surgery.load(path, arch=UNet).eval()  # shapes from the state_dict, no trace
    assert back.up1.up.weight.shape == pruned.up1.up.weight.shape
    x = torch.randn(2, 3, 21, 17)
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)
    # round 2 on the loaded model
    again, plan2 = zoo.l1_prune(back.double())
    assert plan2.layers["up1.up"].channels == pruned.up1.up.out_channels
    zoo.assert_equivalent(back, again, plan2, x.double())


def test_flops_of_a_transposed_conv_count_its_input_positions() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 6, 2, stride=2))
    flops = surgery.layer_flops(model, surgery.output_positions(model, (3, 5, 5)))
    # every input position multiplies the whole (4, 6, 2, 2) weight once
    assert flops == {"0": 3 * 4 * 25, "1": 4 * 6 * 2 * 2 * 25}


def test_crops_pads_and_narrows_that_spare_the_channels() -> None:
    torch.manual_seed(0)
    model = Crops().double().eval()
    graph = surgery.build_graph(model)
    frozen = {m: g.reason for g in graph.groups if g.frozen for m in g.members}
    # fc1's features are sliced at h[..., :4]: a 2-D tensor's last axis is its channels
    assert set(frozen) == {"fc1", "fc2"} and "getitem" in frozen["fc1"]
    pruned, plan = zoo.l1_prune(model, ratio=0.5)
    assert {"a", "b", "c"} <= set(plan.layers)
    assert pruned.fc1.in_features == pruned.c.out_channels == 3
    zoo.assert_equivalent(model, pruned, plan, torch.randn(3, 3, 8, 9, dtype=torch.float64))


def test_padding_or_slicing_the_channels_freezes_them() -> None:
    graph = surgery.build_graph(PadsChannels())
    reasons = {m: g.reason for g in graph.groups if g.frozen for m in g.members}
    assert reasons["a"] == "consumed by unsupported operation 'pad'"
    assert reasons["b"] == "consumed by unsupported operation 'getitem'"  # b(x)[:, 1:]
    assert set(reasons) == {"a", "b", "head"}


def test_channels_last_padding_spares_the_channels_only_with_zeros_first() -> None:
    class Tokens(nn.Module):
        def __init__(self, first: int) -> None:
            super().__init__()
            self.conv, self.fc, self.first = nn.Conv2d(3, 4, 1), nn.Linear(4, 2), first

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
            y = nn.functional.pad(y, (0, self.first, 0, 1, 0, 1))  # Swin's odd-size padding
            return self.fc(y)

    assert not surgery.build_graph(Tokens(0)).group_of("conv").frozen  # type: ignore[union-attr]
    assert surgery.build_graph(Tokens(1)).group_of("conv").frozen  # type: ignore[union-attr]
    torch.manual_seed(0)
    model = Tokens(0).double().eval()
    pruned, plan = surgery.prune(model, {"conv": np.arange(4.0)}, count=2)
    assert pruned.fc.in_features == 2
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
)
def test_torchvision_segmentation_models_prune(name: str) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
    model = model.double().eval()
    pruned, plan = zoo.l1_prune(model)
    assert surgery.count_params(pruned) < 0.8 * surgery.count_params(model)
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x, out=lambda y: y["out"])  # a dict of outputs


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_nets_prune_save_load_and_prune_again(affine: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = StyleNet(affine).double().eval()
    frozen = {m for g in surgery.build_graph(model).groups if g.frozen for m in g.members}
    assert frozen == {"out.1"}  # reaches the output
    pruned, plan = zoo.l1_prune(model)
    assert pruned.in1.num_features == pruned.conv1[1].out_channels < 8
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x)
    path = tmp_path / "style.pt"
    surgery.save(path, pruned, arch="tests.surgery.nets.StyleNet", arch_kwargs={"affine": affine})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when num_features disagrees with the input
        back = surgery.load(path, arch=StyleNet).eval().double()
        assert back.in1.num_features == pruned.in1.num_features
        with torch.no_grad():
            torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)
    again, plan2 = zoo.l1_prune(back)
    assert again.in2.num_features < back.in2.num_features
    zoo.assert_equivalent(back, again, plan2, x)


def test_depthwise_transposed_conv_follows_its_input(tmp_path: Path) -> None:
    """CenterNet's upsampling: a depthwise ConvTranspose2d loses the channels its input
    loses (its weight rows, groups following), exactly, and loads back by shapes."""
    torch.manual_seed(0)
    model = IdaUp().double().eval()
    graph = surgery.build_graph(model)
    frozen = {m: g.reason for g in graph.groups if g.frozen for m in g.members}
    assert frozen == {"head": "reaches the model output"}
    (group,) = [g for g in graph.groups if "proj.0" in g.members]
    assert set(group.members) == {"stem.0", "proj.0", "up"}  # summed after the upsampling
    pruned, plan = zoo.l1_prune(model)
    assert "proj.0" in plan.layers and "down.0" in plan.layers
    up = pruned.up
    assert up.in_channels == up.out_channels == up.groups == pruned.proj[0].out_channels < 16
    assert up.weight.shape == (up.groups, 1, 4, 4)
    x = torch.randn(2, 3, 14, 18, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x)
    zoo._train_step(pruned, x)
    path = tmp_path / "ida.pt"
    surgery.save(path, pruned.float(), arch="tests.surgery.nets.IdaUp")
    back = surgery.load(path, arch=IdaUp).eval()  # shapes from the state_dict, no trace
    assert (back.up.groups, back.up.in_channels) == (up.groups, up.in_channels)
    with torch.no_grad():
        torch.testing.assert_close(back(x.float()), pruned.float()(x.float()), rtol=0, atol=0)
    again, plan2 = zoo.l1_prune(back.double())  # round 2
    assert again.up.groups < back.up.groups
    zoo.assert_equivalent(back.double(), again, plan2, x)


def test_grouped_transposed_conv_keeps_the_channels_it_reads() -> None:
    torch.manual_seed(0)
    model = IdaUp(groups=4).double().eval()
    graph = surgery.build_graph(model)
    frozen = {m: g.reason for g in graph.groups if g.frozen for m in g.members}
    assert set(frozen) == {"head", "stem.0", "proj.0"}
    assert "up" in frozen["proj.0"]
    pruned, plan = zoo.l1_prune(model)
    assert pruned.up.weight.shape == model.up.weight.shape and "down.0" in plan.layers
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 14, 18, dtype=torch.float64))
