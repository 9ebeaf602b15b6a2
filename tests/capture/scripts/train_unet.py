"""A small U-Net as people write it: ``nn.ReLU`` modules, a ``ConvTranspose2d`` whose
output is concatenated with the skip before any activation, a 1x1 head.

With no ``--include``, ``tdump record`` records the ReLU outputs and the up-conv's
(the pre-activation no ReLU carries), so ranking scores every conv but the head.
Deterministic synthetic 2x16x16 data, per-pixel labels.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = _block(2, 6)
        self.down = nn.MaxPool2d(2)
        self.mid = _block(6, 8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.dec = _block(12, 6)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        u = self.up(self.mid(self.down(e)))
        return self.head(self.dec(torch.cat([u, e], 1)))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(4, 2, 16, 16, generator=g)
        y = torch.randint(0, 3, (4, 16, 16), generator=g)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), sys.argv[1] if len(sys.argv) > 1 else "unet.pt")
