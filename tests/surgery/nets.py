"""Small custom models for the surgery tests (importable as ``tests.surgery.nets.<Name>``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-bn-relu-conv-linear, the linear reading the flattened 4x4 map (16 features per channel)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(6 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class SmallNet(nn.Module):
    """Residual add, concatenation, depthwise conv, a 1-output-channel conv and a grouped conv."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1, bias=False)
        self.b_bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        self.dw_bn = nn.BatchNorm2d(14)
        self.gate = nn.Conv2d(14, 1, 1)  # one output channel: not depthwise
        self.e = nn.Conv2d(14, 8, 1, bias=False)
        self.e_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.grouped_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(14 + 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem_bn(self.stem(x)))
        r = torch.relu(self.a_bn(self.a(s)) + s)
        c = torch.cat([r, torch.relu(self.b_bn(self.b(r)))], dim=1)
        d = torch.relu(self.dw_bn(self.dw(c)))
        d = d * torch.sigmoid(self.gate(d))
        e = torch.relu(self.e_bn(self.e(d)))
        g = torch.relu(self.grouped_bn(self.grouped(e)))
        return self.fc(torch.cat([d.mean((2, 3)), g.mean((2, 3))], dim=1))


class Untraceable(nn.Module):
    """A block with data-dependent control flow inside an otherwise traceable model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 4, 1)
        self.block = _Branchy()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.block(self.conv(x)))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class RootBranch(nn.Module):
    """Branches on its input's rank in its own forward (a grayscale batch without channels)."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(self.prepare(x))))
        return self.fc(x.mean((2, 3)))


class _Prepare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x


class BranchInSubmodule(RootBranch):
    """:class:`RootBranch` with the branch moved into a submodule, as the error advises."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__(num_classes)
        self.prep = _Prepare()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.prep(x)


class PadToSkip(nn.Module):
    """Down, up, and resize to the skip's size when they differ (odd inputs), then add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.a(x))
        y = nn.functional.interpolate(torch.relu(self.b(skip)), scale_factor=2)
        if y.shape[-2:] != skip.shape[-2:]:  # a U-Net's fix for odd sizes
            h, w = skip.shape[-2:]
            y = nn.functional.interpolate(y, size=(h, w))
        return self.head(y + skip)


class ValueBranch(nn.Module):
    """Branches on a tensor's values: no input shape makes that traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.mean() > 0 else -y


class IterShape(nn.Module):
    """Iterates over a shape (not tuple unpacking, which fx handles itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if [d for d in x.shape[-2:]] != [8, 8]:
            x = nn.functional.interpolate(x, size=(8, 8))
        return self.head(torch.relu(self.conv(x)))
