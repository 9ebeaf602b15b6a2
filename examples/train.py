"""A plain PyTorch training script: no tdump in it. Capture it with `tdump record`.

    python examples/train.py --max-steps 300 --out out/ckpt.pt
    tdump record --out out/dump.zarr examples/train.py -- --max-steps 300 --out out/ckpt.pt

``--init`` starts from a checkpoint: a tdump pruned checkpoint (``tdump.load`` rebuilds
the pruned model), or a state_dict (pruned shapes are inferred). The trained model is
saved the usual way, ``torch.save(model.state_dict(), out)``; the next pruning round
reads it with ``tdump prune out.pt ranks.parquet --like pruned.pt``. The last line
printed is ``RESULT {json}`` with accuracy, parameters and steps, for drivers to parse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arch_path, build_model, count_params, evaluate, load_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default="auto",
        help="fashion-mnist | digits | caltech101 | IMAGEFOLDER_DIR | auto",
    )
    p.add_argument("--data-root", default=None, help="root folder for caltech101")
    p.add_argument(
        "--arch",
        default=None,
        help="torchvision model name or import path (default: resnet18, or --init's own)",
    )
    p.add_argument(
        "--init", default=None, help="checkpoint to start from (tdump checkpoint or state_dict)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--train-limit", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument(
        "--test-limit", type=int, default=2000, help="evaluate on the first N test images"
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate --init and exit")
    p.add_argument("--out", default=None, help="where to save the trained checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def load_start(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.init is None:
        return build_model(args.arch or "resnet18", num_classes)
    import tdump

    arch = arch_path(args.arch) if args.arch else None
    try:  # the arch inside a checkpoint is built only if registered (torchvision, register_arch)
        return tdump.load(args.init, arch=arch, arch_kwargs={"num_classes": num_classes})
    except tdump.TdumpError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, num_classes = load_dataset(
        args.data, train=True, root=args.data_root, limit=args.train_limit
    )
    test_set, _ = load_dataset(args.data, train=False, root=args.data_root, limit=args.test_limit)
    test_loader = DataLoader(test_set, batch_size=256)
    model = load_start(args, num_classes)
    if args.eval_only:
        result = {
            "accuracy": evaluate(model, test_loader),
            "params": count_params(model),
            "steps": 0,
        }
        print("RESULT " + json.dumps(result))
        return result

    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=False)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    total = args.max_steps or args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total)
    step, start = 0, time.perf_counter()
    model.train()
    while step < total:
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 50 == 0 or step == total:
                rate = step / (time.perf_counter() - start)
                print(
                    f"step {step}/{total}  loss {loss.item():.3f}  {rate:.1f} steps/s", flush=True
                )
            if step >= total:
                break
    accuracy = evaluate(model, test_loader)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.out)
    result = {"accuracy": accuracy, "params": count_params(model), "steps": step}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
