"""A plain nn.Sequential CNN with no tdump in it: its activations are named by index.

``tdump record``'s default selection must still find them (``include_activations``),
or ``tdump rank`` has nothing to rank. Deterministic synthetic data, SGD, 6 steps.
"""

from __future__ import annotations

import torch
from torch import nn


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(4, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()


if __name__ == "__main__":
    main()
