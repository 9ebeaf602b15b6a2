"""A user's plain training script, no tdump in it but ``tdump.load`` for a pruned start.

Random batches (nothing to download), a few SGD steps, ``torch.save(state_dict)``.
Models that return auxiliary outputs in training (GoogLeNet, Inception v3) are trained
on their main logits only, as most scripts do. Driven by ``benchmarks/two_rounds.py``.

    python benchmarks/_plain_train.py --arch resnet18 --out ckpt.pt
    python benchmarks/_plain_train.py --init pruned.pt --out ft.pt
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="torchvision model name")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the builder")
    p.add_argument("--init", help="a pruned checkpoint to start from (tdump.load)")
    p.add_argument("--out", required=True, help="where to save the state_dict")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.init:
        import tdump

        model = tdump.load(a.init)
    else:
        kwargs = json.loads(a.kwargs)
        model = torchvision.models.get_model(a.arch, num_classes=10, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(a.steps):
        x = torch.randn(a.batch, 3, a.size, a.size, generator=g)
        y = torch.randint(0, 10, (a.batch,), generator=g)
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out  # GoogLeNet/Inception outputs
        opt.zero_grad()
        loss_fn(logits, y).backward()
        opt.step()
    torch.save(model.state_dict(), a.out)
    print(json.dumps({"params": sum(q.numel() for q in model.parameters())}))


if __name__ == "__main__":
    main()
