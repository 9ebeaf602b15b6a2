"""Do tdump's criteria rank filters the way removing them does? Agreement with the oracle.

Molchanov et al. 2017 ("Pruning CNNs for Resource Efficient Inference", section 3)
judge a criterion by its Spearman correlation with the **oracle**: the change in the
training loss when one feature map is removed, measured by removing it. This script

1. trains a small residual CNN (a depthwise block with a skip, a concatenation of two
   branches, a classifier head: coupled channels, as in torchvision models) on
   scikit-learn's digits (or Debian's Fashion-MNIST with ``--data fashion-mnist``);
2. records ``--batches`` training batches at the trained weights with a real
   ``tdump.capture.Hook`` (the seed's selection plus activation outputs and their
   gradients; forward and backward, no optimizer step, so every batch sees one model);
3. ranks the dump with every registered criterion (``tdump.analyze.rank``) and with
   random scores;
4. computes the oracle: for every ranked channel, ``tdump.prune`` removes that one
   channel (with all channels coupled to it) and the loss over the same batches is
   measured again (train mode, as during recording);
5. prints, per criterion, the Spearman correlation with the oracle's ``|change|``
   within each layer (mean over layers) and over all layers (``score_norm``, as a
   global prune ranks them), then the held-out accuracy and loss **without
   fine-tuning** after a global prune of 10% and 30% of the channels by each
   criterion, by the oracle itself, and by random scores (mean, min and max of
   ``--random`` seeds).

Run: ``.venv/bin/python benchmarks/oracle_correlation.py`` (about 2 minutes on
2 cores); ``--data fashion-mnist --epochs 3`` after ``apt-get install
dataset-fashion-mnist`` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import tdump
from tdump.analyze import criteria, rank
from tdump.capture import Hook

SEED_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"
FASHION = Path("/usr/share/datasets/fashion-mnist")
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class Net(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.b1 = Block(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.side = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(3 * width, 4 * width, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b1(self.stem(x))
        return self.head(torch.cat([self.down(x), self.side(x)], dim=1))


def load(data: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and held-out images (N, 1, H, W) in [0, 1] and their labels."""
    if data == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        xs = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
        ys = torch.tensor(y)
        perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))
        xs, ys = xs[perm], ys[perm]
        return xs[:1400], ys[:1400], xs[1400:], ys[1400:]
    if not FASHION.is_dir():
        raise SystemExit(f"no Fashion-MNIST at {FASHION}: apt-get install dataset-fashion-mnist")

    def read(prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        with gzip.open(FASHION / f"{prefix}-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
        with gzip.open(FASHION / f"{prefix}-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
        return torch.tensor(x, dtype=torch.float32) / 255, torch.tensor(y, dtype=torch.long)

    return (*read("train", 12000), *read("t10k", 2000))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> Batches:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in perm.split(size) if len(i) == size]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, size: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, size, seed=100 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()


@torch.no_grad()
def train_loss(model: nn.Module, data: Batches) -> float:
    """Mean loss over ``data`` in train mode (batch statistics, as the recording saw);
    ``model`` is a copy, so its running statistics may change."""
    model.train()
    return float(np.mean([F.cross_entropy(model(xb), yb).item() for xb, yb in data]))


@torch.no_grad()
def held_out(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and loss on held-out data in eval mode."""
    model.eval()
    out = model(x)
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


def record(model: nn.Module, data: Batches, out: Path) -> None:
    """Forward and backward of each batch at fixed weights, every step saved."""
    hook = Hook(out, include_regex=SEED_INCLUDE, include_activations=True, save_interval=1)
    hook.register_module(model)
    model.train()
    with hook:
        for xb, yb in data:
            model.zero_grad()
            F.cross_entropy(model(xb), yb).backward()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties), computed with numpy."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v[np.diff(np.sort(v), prepend=np.nan) == 0]):
            r[v == value] = r[v == value].mean()
        return r

    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle(model: nn.Module, layers: dict[str, int], data: Batches) -> dict[str, np.ndarray]:
    """Loss change over ``data`` when each channel of each layer is removed by tdump.prune."""
    base = train_loss(copy.deepcopy(model), data)
    result = {}
    for layer, n in layers.items():
        change = np.empty(n)
        for c in range(n):
            scores = np.ones(n)
            scores[c] = 0.0
            pruned, _ = tdump.prune(copy.deepcopy(model), {layer: scores}, count=1)
            change[c] = train_loss(pruned, data) - base
        result[layer] = change
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["digits", "fashion-mnist"], default="digits")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="training batches recorded")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--random", type=int, default=5, help="random rankings to average")
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load(a.data)
    model = Net(a.width)
    t0 = time.perf_counter()
    train(model, xtr, ytr, a.epochs, a.batch)
    data = batches(xtr, ytr, a.batch, seed=999)[: a.batches]
    trained = copy.deepcopy(model.state_dict())
    acc, loss = held_out(model, xte, yte)
    print(
        f"# torch {torch.__version__}, {a.data}, {a.epochs} epochs: held-out accuracy "
        f"{acc:.3f}, loss {loss:.3f}; {a.batches} recorded batches of {a.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "dump.zarr"
        record(model, data, dump)
        model.load_state_dict(trained)  # the recording's BN running statistics moved
        tables = {}
        for name in criteria():
            try:
                tables[name] = rank(dump, criterion=name, progress=False)
            except tdump.errors.TdumpError as exc:
                print(f"# {name}: not ranked ({exc})")
    layers = {
        str(layer): int(group["channel"].max()) + 1
        for layer, group in tables["taylor"].groupby("layer")
    }
    changes = oracle(model, layers, data)
    t1 = time.perf_counter()
    print(f"# oracle: {sum(layers.values())} channels of {len(layers)} layers ({t1 - t0:.0f} s)")
    rng = np.random.default_rng(0)
    rows = []
    for name, df in tables.items():
        df = df[df["layer"].isin(layers)]
        within = []
        for layer, group in df.groupby("layer"):
            ch = group["channel"].to_numpy()
            within.append(spearman(group["score"].to_numpy(), np.abs(changes[layer][ch])))
        truth = np.concatenate(
            [np.abs(changes[str(r.layer)][[r.channel]]) for r in df.itertuples()]
        )
        rows.append((name, np.nanmean(within), spearman(df["score_norm"].to_numpy(), truth)))
    random_within = [
        np.nanmean([spearman(rng.random(len(v)), np.abs(v)) for v in changes.values()])
        for _ in range(a.random)
    ]
    rows.append((f"random x{a.random}", float(np.mean(random_within)), float("nan")))
    print(f"{'criterion':<16} {'Spearman within layer':>22} {'over all layers':>16}")
    for name, within_layer, overall in rows:
        print(f"{name:<16} {within_layer:>22.3f} {overall:>16.3f}")

    print(f"\n{'pruned by':<16} {'ratio':>5} {'params':>8} {'accuracy':>9} {'loss':>7}")
    print(
        f"{'(trained)':<16} {'':>5} {sum(p.numel() for p in model.parameters()):>8} {acc:>9.3f} {loss:>7.3f}"
    )
    oracle_ranks = {layer: np.abs(v) for layer, v in changes.items()}
    for ratio in (0.1, 0.3):
        plans = [(name, df[df["layer"].isin(layers)]) for name, df in tables.items()]
        plans.append(("oracle |change|", oracle_ranks))
        for name, ranks in plans:
            pruned, _ = tdump.prune(copy.deepcopy(model), ranks, ratio=ratio)
            pa, pl = held_out(pruned, xte, yte)
            n = sum(p.numel() for p in pruned.parameters())
            print(f"{name:<16} {ratio:>5} {n:>8} {pa:>9.3f} {pl:>7.3f}")
        accs, losses = [], []
        for seed in range(a.random):
            r = np.random.default_rng(seed)
            ranks = {layer: r.random(n) for layer, n in layers.items()}
            pa, pl = held_out(tdump.prune(copy.deepcopy(model), ranks, ratio=ratio)[0], xte, yte)
            accs.append(pa)
            losses.append(pl)
        print(
            f"{'random':<16} {ratio:>5} {'':>8} {np.mean(accs):>9.3f} {np.mean(losses):>7.3f}"
            f"  (accuracy {min(accs):.3f}-{max(accs):.3f} over {a.random} seeds)"
        )


if __name__ == "__main__":
    main()
