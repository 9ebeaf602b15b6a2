"""Zeroed channels pruned away: the pruned model computes the same function, for each supported architecture."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tests.surgery.helpers import randomize_bn, zero_and_rank
from tests.surgery.nets import SmallNet, TinyNet

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),  # groups=32
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),  # SE: x * scale
    "small_custom": lambda: SmallNet(),
    "tiny_custom": lambda: TinyNet(),
}


def _check_groups(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size), (
                name
            )
        if isinstance(m, nn.BatchNorm2d):
            assert (
                m.weight.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,)
            ), name
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name


@pytest.mark.parametrize("arch", list(MODELS))
def test_pruning_zeroed_channels_is_exact(arch: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(MODELS[arch]()).eval()
    scores, zeroed = zero_and_rank(model)
    assert zeroed > 0
    size = 32 if arch in ("tiny_custom", "small_custom") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    pruned, plan = surgery.prune(model, scores, count=zeroed)
    assert plan.removed == zeroed
    assert surgery.count_params(pruned) < surgery.count_params(model)
    _check_groups(pruned)
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the pruned model trains: forward and backward run, every parameter gets a gradient
    pruned.train()
    pruned(x).square().mean().backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
