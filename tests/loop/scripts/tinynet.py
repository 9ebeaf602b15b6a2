"""A tiny conv net for the loop tests (importable as ``tinynet.TinyNet`` from this folder)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class TokenNet(nn.Module):
    """A conv stem, then patch tokens with a class token, as a ViT: ``embed`` is never pruned.

    ``embed``'s channels meet the learned class token in a ``torch.cat``, so the
    surgery leaves them alone (as torchvision's ViT ``conv_proj``); ``conv1`` prunes.
    """

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.embed = nn.Conv2d(width, width, 4, stride=4)
        self.token = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        tokens = self.embed(out).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.fc(self.norm(tokens)[:, 0])


class SkipNet(TinyNet):
    """TinyNet with a projection shortcut, as a ResNet's downsample conv.

    ``proj``'s BatchNorm output goes into the residual ``+``, so no activation module
    receives its channels alone and Taylor cannot score it; but they are summed with
    ``conv2``'s, which is scored (its ``bn2`` output is the tensor ``+=`` adds into, as
    in torchvision's ResNet), and the surgery prunes both together.
    """

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__(width, classes)
        self.proj = nn.Conv2d(3, width, 1, bias=False)
        self.bnp = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += self.bnp(self.proj(x))
        return self.fc(torch.flatten(self.pool(self.relu2(out)), 1))
