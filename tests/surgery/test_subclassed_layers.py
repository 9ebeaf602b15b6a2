"""Subclassed layers: a subclass that only adds a constructor (torchvision's video
ResNets' ``Conv3DSimple(nn.Conv3d)``) prunes as its torch layer; one with its own
forward is traced into.

Equivalence is checked independently of the channel graph (``zoo.zeroed_reference``:
the unpruned model with the removed channels computed away by forward hooks), in float64.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tests.surgery import zoo


class PlainConv(nn.Conv2d):
    """A constructor-only subclass (as torchvision's ``Conv3DSimple``): computes as Conv2d."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)


class StandardizedConv(nn.Conv2d):
    """Weight standardization (BiT): each filter's weights normalised at every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = PlainConv(3, 8), PlainConv(8, 8)
        self.ws = StandardizedConv(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(torch.relu(self.ws(x)).mean((2, 3)))


def test_a_constructor_only_conv_subclass_prunes_and_one_with_its_own_forward_is_kept() -> None:
    """PlainConv is a Conv2d; StandardizedConv computes its weight from itself, so its
    inputs cannot be sliced exactly (a filter's mean and std would change): c2's
    channels, which it reads, stay; c1's go."""
    torch.manual_seed(0)
    model = SubclassNet().double().eval()
    frozen = {m: g.reason for g in surgery.build_graph(model).groups if g.frozen for m in g.members}
    assert "c1" not in frozen and "c2" in frozen
    pruned, plan = zoo.l1_prune(model)
    assert pruned.c1.out_channels < 8 and type(pruned.c1) is PlainConv
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_video_resnet_prunes_saves_loads_and_prunes_again(tmp_path: Path) -> None:
    """mc3_18's convs are Conv3DSimple / Conv3DNoTemporal (constructor-only Conv3d
    subclasses): they used to be traced into, and F.conv3d froze every channel."""
    torch.manual_seed(0)
    model = torchvision.models.video.mc3_18(num_classes=5).double().eval()
    pruned, plan = zoo.l1_prune(model)
    assert set(plan.notes) == {"left alone fc: reaches the model output"}
    assert surgery.count_params(pruned) < 0.6 * surgery.count_params(model)
    x = torch.randn(1, 3, 4, 24, 24, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x)
    path = tmp_path / "mc3.pt"
    surgery.save(
        path, pruned, arch="torchvision.models.video.mc3_18", arch_kwargs={"num_classes": 5}
    )
    back = surgery.load(path).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)
    again, plan2 = zoo.l1_prune(back)
    assert surgery.count_params(again) < surgery.count_params(back)
    zoo.assert_equivalent(back, again, plan2, x)
