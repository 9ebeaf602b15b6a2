"""A Hook that the script never closes (the README snippet without `with hook:`)."""

import sys

import torch
from torch import nn

from tdump.capture import Hook

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
hook = Hook(sys.argv[1], include_regex=".*", save_interval=1)
hook.register_module(model)
for _ in range(6):
    opt.zero_grad()
    model(torch.randn(8, 3, 32, 32)).sum().backward()
    opt.step()
