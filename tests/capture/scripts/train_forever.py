"""Trains until stopped (a signal or a stop request), printing STEP <n> after each step."""

import time

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = nn.CrossEntropyLoss()
step = 0
while True:
    opt.zero_grad()
    loss_fn(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    step += 1
    print(f"STEP {step}", flush=True)
    time.sleep(0.05)
