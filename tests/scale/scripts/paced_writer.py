"""Train a tiny net under a Hook, pausing after each saved record until a reader acknowledges it.

``paced_writer.py OUT ACK_DIR STEPS``: at iteration k (k >= 1) the forward pass finishes
record k-1, ``hook.flush()`` commits it, and training waits for the file ``ACK_DIR/<k-1>``
(a reader's "seen it"). The last record is committed when the hook closes.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

import tdump

out, ack_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
crit = nn.CrossEntropyLoss()
g = torch.Generator().manual_seed(0)
with tdump.Hook(out, include_regex=r"^1\.|^0\.weight", save_interval=1, strict=True) as hook:
    hook.register_module(model)
    hook.register_loss(crit)
    for k in range(steps):
        opt.zero_grad()
        loss = crit(model(torch.randn(2, 3, 8, 8, generator=g)), torch.tensor([0, 1]))
        loss.backward()
        opt.step()
        if k == 0:
            continue
        hook.flush()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(ack_dir, str(k - 1))):
            if time.monotonic() > deadline:
                sys.exit(f"no reader acknowledged record {k - 1}")
            time.sleep(0.05)
print("done")
