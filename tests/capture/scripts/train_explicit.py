"""A script that uses tdump.capture.Hook itself (explicit use wins over `tdump record`)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from tdump.capture import Hook

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with Hook(sys.argv[1], include_regex="1", save_interval=1, strict=True) as hook:
    hook.register_module(model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
