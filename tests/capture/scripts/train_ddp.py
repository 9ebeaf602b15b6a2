"""A plain DDP training script (gloo, CPU), no tdump in it: `train_ddp.py RANK WORLD INIT_FILE`.

The rank comes only from torch.distributed (no RANK variable), so capture must ask it.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
torch.manual_seed(0)
model = DistributedDataParallel(
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
crit = nn.CrossEntropyLoss()
g = torch.Generator().manual_seed(rank)
for _ in range(3):
    opt.zero_grad()
    crit(model(torch.randn(2, 3, 8, 8, generator=g)), torch.tensor([0, 1])).backward()
    opt.step()
dist.destroy_process_group()
