"""A plain training script (no tdump in it) that trains slowly until stopped.

A tiny net on synthetic data, a module loss, SGD; ``--sleep`` seconds per step so a
watcher can keep up; at step ``--nan-at`` a NaN enters ``fc.weight``. Prints
``STEP <n>`` every step and ``DONE`` at the end (a stopped run never prints it).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--nan-at", type=int, default=-1)
    p.add_argument("--sleep", type=float, default=0.05)
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    fc = model[3]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for step in range(args.steps):
        if step == args.nan_at:
            with torch.no_grad():
                fc.weight[0, 0] = float("nan")
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
        print(f"STEP {step}", flush=True)
        time.sleep(args.sleep)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
