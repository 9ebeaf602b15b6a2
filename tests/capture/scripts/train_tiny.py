"""A plain training script with no tdump in it (used by the `tdump record` tests).

Deterministic: fixed seed, synthetic data, a tiny conv net with a residual add and
in-place ReLUs, a module loss (or ``--functional`` for F.cross_entropy), SGD, an
evaluation pass at the end. Prints ``RESULT <loss>`` last.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        identity = out
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--functional", action="store_true")
    p.add_argument("--freeze-conv1", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TinyNet()
    if args.freeze_conv1:
        model.conv1.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    model.train()
    loss = torch.zeros(())
    for _ in range(args.steps):
        x = torch.randn(args.batch, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (args.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y) if args.functional else crit(logits, y)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 8, 8, generator=g))
    print(f"RESULT {loss.item():.6f}")


if __name__ == "__main__":
    main()
