"""The PyTorch tutorial's CNN: every activation is ``F.relu``, so no module is an activation.

With no ``--include``, ``tdump record`` then records the conv outputs (pre-activations)
with their gradients, which ranking scores. Deterministic synthetic 3x16x16 data.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), sys.argv[1] if len(sys.argv) > 1 else "functional.pt")
