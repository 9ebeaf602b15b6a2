"""The docs' `train.py`: a plain training script with no tdump in it.

ResNet18 (10 classes) on random 32x32 images for a few steps; saves the usual
``torch.save(model.state_dict(), "ckpt.pt")`` at the end. ``--init PATH`` starts from
a checkpoint (a tdump one via ``tdump.load``), ``--out PATH`` names the output.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--init", default="")
    p.add_argument("--out", default="ckpt.pt")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.init:
        import tdump

        model = tdump.load(args.init)
    else:
        model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(args.epochs * args.steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
