"""A training script that `tdump loop` drives: the lines marked ``# tdump`` are all it needs.

    tdump loop examples/loop_train.py --rounds 4 --ratio 0.25 \\
        --arch torchvision.models.resnet18 --arch-kwargs '{"num_classes": 10}' -- --steps 300

The loop sets ``TDUMP_INIT`` (empty in round 0: build the model; later the pruned
checkpoint to fine-tune), ``TDUMP_OUT`` (where to save) and ``TDUMP_ROUND``. The
script reports its validation accuracy with ``tdump.report`` (a no-op outside the
loop), so it also runs as a plain script: ``TDUMP_OUT=m.pt python examples/loop_train.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import tdump

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_dataset

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument(
    "--steps", type=int, default=300, help="optimizer steps of round 0 (batches of --batch-size)"
)
p.add_argument("--finetune-steps", type=int, default=None, help="steps when fine-tuning [--steps]")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--data", default="auto", help="fashion-mnist | digits | auto (see common.py)")
p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
p.add_argument("--test-limit", type=int, default=2000, help="evaluate on the first N test images")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument(
    "--amp",
    action="store_true",
    help="mixed precision, for GPUs: float16 autocast with a GradScaler on CUDA; on a CPU "
    "bfloat16 autocast, which pays only with AVX-512 BF16 or AMX (about 20x slower than "
    "float32 on the 2-core reference VM)",
)
args = p.parse_args()
torch.manual_seed(0)
train_set, classes = load_dataset(args.data, train=True, limit=args.train_limit)
test_set, _ = load_dataset(args.data, train=False, limit=args.test_limit)

init = os.environ.get("TDUMP_INIT")  # tdump
model = tdump.load(init) if init else torchvision.models.resnet18(num_classes=classes)  # tdump
model.to(args.device)
steps = args.finetune_steps if init and args.finetune_steps else args.steps
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
half = torch.float16 if args.device.startswith("cuda") else torch.bfloat16
# tdump finds the scaler and records gradients divided by its scale; disabled, it is a no-op
scaler = torch.amp.GradScaler(args.device, enabled=args.amp and half == torch.float16)
step = 0
model.train()
while step < steps:
    for x, y in DataLoader(train_set, batch_size=args.batch_size, shuffle=True):
        x, y = x.to(args.device), y.to(args.device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=half, enabled=args.amp):
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step}/{steps}", flush=True)
        if step == steps:
            break
model.eval()
correct = total = loss_sum = 0.0
with torch.no_grad():
    for x, y in DataLoader(test_set, batch_size=256):
        x, y = x.to(args.device), y.to(args.device)
        logits = model(x)
        loss_sum += float(criterion(logits, y)) * len(y)
        correct += float((logits.argmax(1) == y).sum())
        total += len(y)
accuracy, loss = correct / total, loss_sum / total
print(f"round {os.environ.get('TDUMP_ROUND', '-')}: {step} steps, accuracy {accuracy:.4f}")
tdump.report(accuracy=accuracy, loss=loss)  # tdump
torch.save(model.cpu().state_dict(), os.environ.get("TDUMP_OUT", "model.pt"))  # tdump
