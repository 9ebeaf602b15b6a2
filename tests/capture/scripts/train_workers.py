"""A plain script whose DataLoader forks worker processes, and a forked helper process.

Both forks happen while capture runs (``tdump record`` or ``--hook OUT``): the workers
of epochs 2 and 3 are forked after the writer thread started, and ``--train-in-child``
forks a process that runs forward and backward on the captured model;
``--term-child`` forks one that SIGTERM ends. Prints ``CHILD <exitcode> <seconds>``
for each helper and ``RESULT <loss>`` last.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 3),
    )  # fmt: skip


def steps(model: nn.Module, n: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.zeros(())
    for _ in range(n):
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hook", default=None, help="capture with an explicit Hook into this store")
    p.add_argument("--train-in-child", action="store_true")
    p.add_argument("--term-child", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)  # a forked child must not inherit a parent's thread pool
    torch.manual_seed(0)
    model = net()
    hook = None
    if args.hook:
        from tdump.capture import Hook

        hook = Hook(args.hook, include_regex=".*", save_interval=1, write_mode="overwrite")
        hook.register_module(model)
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,)))
    loader = DataLoader(data, batch_size=8, num_workers=2, multiprocessing_context="fork")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    loss = torch.zeros(())
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
    for wanted, target, targs in (
        (args.train_in_child, steps, (model, 2)),
        (args.term_child, time.sleep, (60,)),
    ):
        if wanted:
            child = mp.get_context("fork").Process(target=target, args=targs)
            start = time.monotonic()
            child.start()
            if target is time.sleep:
                time.sleep(0.5)
                child.terminate()
            child.join()
            print(f"CHILD {child.exitcode} {time.monotonic() - start:.1f}", flush=True)
    if hook is not None:
        hook.close()
    print(f"RESULT {loss.item():.6f}")


if __name__ == "__main__":
    main()
