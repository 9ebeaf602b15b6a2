"""Decoys before training: a part of the model called alone, a no-grad dry run, an fx
trace, and a second trainable module that no optimizer updates."""

import torch
import torch.fx
from torch import nn

torch.manual_seed(0)
features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
model = nn.Sequential(features, nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
probe = nn.Linear(5, 5)  # trainable, never optimized
probe(torch.randn(1, 5))
features(torch.randn(1, 3, 8, 8))  # "what shape do the features have?"
with torch.no_grad():
    model(torch.zeros(1, 3, 8, 8))  # a summary / dry run
torch.fx.symbolic_trace(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()
for _ in range(3):
    opt.zero_grad()
    loss_fn(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    opt.step()
