"""Calls torch.fx.symbolic_trace on the model before training (as tdump.load does)."""

import torch
import torch.fx
from torch import nn

torch.manual_seed(0)
block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
model = nn.Sequential()
model.add_module("block", block)
model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 2)))
torch.fx.symbolic_trace(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()
for _ in range(3):
    opt.zero_grad()
    loss_fn(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    opt.step()
