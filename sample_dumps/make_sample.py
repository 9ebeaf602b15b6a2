"""Regenerate ``sample_dumps/tiny.zarr``: a small committed dump for docs and tests.

A tiny CNN (conv-bn-relu, conv-bn, residual add, the same ReLU module called twice
as in torchvision's BasicBlock, global pool, linear) is trained for 40 steps on
scikit-learn's bundled 8x8 digits (synthetic digits-like data if scikit-learn is
missing, and the script says so), captured with the seed's selection every 10 steps,
plus two evaluation passes. Everything is seeded, single-threaded, and the records'
times and the creation time are fixed, so a rerun rewrites the same bytes.

    python sample_dumps/make_sample.py            # -> sample_dumps/tiny.zarr (< 5 MB)
    python sample_dumps/make_sample.py --out x.zarr
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdump._format import StoreReader, StoreWriter
from tdump.capture import DEFAULT_INCLUDE, Hook

HERE = Path(__file__).resolve().parent
CREATED = "2026-01-01T00:00:00+00:00"
T0 = 1_767_225_600.0  # 2026-01-01 UTC: the records' times count up from here


class TinyCNN(nn.Module):
    """conv1-bn1-relu, conv2-bn2, += identity, relu (2nd call), pool, fc."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        identity = out
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


# the module tree records the class's qualified name: the same however this file is run
TinyCNN.__module__ = "sample_dumps.make_sample"


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float32 in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("note: scikit-learn not installed; using synthetic digits-like data", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1797,), generator=g)
        x = torch.rand(1797, 1, 8, 8, generator=g) * 0.3
        x[torch.arange(1797), 0, y % 8, :] += 0.7
        return x, y
    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def make(out: Path, steps: int = 40, interval: int = 10, batch: int = 32) -> Path:
    """Train, capture into ``out`` (replaced), return ``out``."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shutil.rmtree(out, ignore_errors=True)
    x, y = load_data()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:1640]
    model = TinyCNN()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    # eval forwards are few: save every eval step; train steps every `interval`
    hook = Hook(
        str(out),
        include_regex=DEFAULT_INCLUDE,
        save_interval=interval,
        mode_save_interval={"eval": 1},
        compression="zstd",  # the committed sample's codec (the default became "auto" later)
        strict=True,
    )
    clock = itertools.count()
    hook.clock = lambda: T0 + next(clock)
    hook.register_module(model)
    hook.register_loss(crit)
    for step in range(steps):
        idx = train[(step * batch) % len(train) :][:batch]
        model.train()
        opt.zero_grad()
        logits = model(x[idx])
        loss = crit(logits, y[idx])
        loss.backward()
        opt.step()
        hook.save_scalar("lr", opt.param_groups[0]["lr"])
        hook.save_scalar("accuracy", float((logits.argmax(1) == y[idx]).float().mean()))
        if step in (interval - 1, steps - 1):
            model.eval()
            with torch.no_grad():
                for part in test.split(120):
                    crit(model(x[part]), y[part])
    hook.close()
    # fixed creation time and a location-free `out`, so reruns anywhere are byte-identical
    config = {**StoreReader(str(out)).meta()["config"], "out": "tiny.zarr"}
    StoreWriter.create(str(out)).update_meta(created=CREATED, config=config)
    return out


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "tiny.zarr"))
    args = p.parse_args()
    out = make(Path(args.out))
    print(f"wrote {out} ({_size(out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
