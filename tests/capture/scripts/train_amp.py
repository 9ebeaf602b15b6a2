"""A plain float16-autocast training script with a GradScaler and no tdump in it.

Saves what ``scaler.unscale_`` made of each parameter's gradient at the first
iteration, and the scale, to ``--grads`` (the `tdump record` test compares the dump
with it). ``--sharded`` uses FSDP's ``ShardedGradScaler`` (its own ``scale``; imported
once training is under way, in a one-process gloo group) instead.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grads", required=True)
    p.add_argument("--sharded", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
    opt = torch.optim.SGD(model.parameters(), 0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    if args.sharded:
        import tempfile

        import torch.distributed as dist
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        store = tempfile.NamedTemporaryFile(delete=False).name  # noqa: SIM115
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        scaler = ShardedGradScaler("cpu", init_scale=2.0**12)
    for i in range(3):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if i == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            torch.save({"scale": scale, "grads": grads}, args.grads)
        scaler.step(opt)
        scaler.update()
    if args.sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
