"""Data and model helpers shared by the example scripts (no tdump imports here).

Datasets, all offline:

* ``fashion-mnist`` — real Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, IDX files); 60,000 train / 10,000 test.
* ``digits`` — scikit-learn's bundled 8x8 digits (1,797 images), the fallback.
* ``caltech101`` — torchvision's Caltech101 under ``--data-root`` (never downloaded).
* any other value — a directory in ImageFolder layout (``root/class/image.jpg``).

``auto`` picks Fashion-MNIST when installed, else digits, and says so.
"""

from __future__ import annotations

import gzip
import importlib
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

FASHION_DIR = Path(os.environ.get("TDUMP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
IMAGE_SIZE = 32


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        _, _, dtype_code, ndim = struct.unpack(">BBBB", fh.read(4))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: unexpected IDX dtype code {dtype_code:#x}")
        shape = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(shape)


def _to_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> TensorDataset:
    """uint8/float HxW images -> normalised 3xSxS float tensors (grey repeated to RGB)."""
    x = torch.from_numpy(images.astype(np.float32) / scale).unsqueeze(1)
    x = nn.functional.interpolate(
        x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    x = (x - x.mean()) / (x.std() + 1e-8)
    # expand, not repeat: three views of one grey plane cost no extra memory.
    return TensorDataset(x.expand(-1, 3, -1, -1), torch.from_numpy(labels.astype(np.int64)))


def resolve_dataset(name: str) -> str:
    """``auto`` -> ``fashion-mnist`` if Debian's package is installed, else ``digits``."""
    if name != "auto":
        return name
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return "fashion-mnist"
    print(
        f"note: Fashion-MNIST not found in {FASHION_DIR} (apt-get install dataset-fashion-mnist); "
        "using scikit-learn's digits instead",
        file=sys.stderr,
    )
    return "digits"


def load_dataset(
    name: str, train: bool, root: str | None = None, limit: int | None = None
) -> tuple[Dataset[Any], int]:
    """Return ``(dataset, num_classes)`` for ``name`` (see module docstring)."""
    name = resolve_dataset(name)
    if name == "fashion-mnist":
        prefix = "train" if train else "t10k"
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        if limit:
            images, labels = images[:limit], labels[:limit]
        return _to_tensors(images, labels, 255.0), 10
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        rng = np.random.default_rng(0)
        order = rng.permutation(len(digits.target))
        cut = int(0.8 * len(order))
        idx = order[:cut] if train else order[cut:]
        if limit:
            idx = idx[:limit]
        return _to_tensors(digits.images[idx], digits.target[idx], 16.0), 10
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    if name == "caltech101":
        if root is None:
            raise SystemExit(
                "error: --data caltech101 needs --data-root DIR holding torchvision's caltech101/"
            )
        ds = datasets.Caltech101(root, transform=tf, download=False)
        return ds, 101
    if not Path(name).is_dir():
        raise SystemExit(
            f"error: --data {name!r} is neither a known dataset nor an ImageFolder directory"
        )
    folder = datasets.ImageFolder(name, transform=tf)
    return folder, len(folder.classes)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Construct ``arch`` (a torchvision model name or an import path) with random weights."""
    if "." not in arch:
        arch = f"torchvision.models.{arch}"
    module_name, _, attr = arch.rpartition(".")
    factory = getattr(importlib.import_module(module_name), attr)
    model: nn.Module = factory(num_classes=num_classes)
    return model


def arch_path(arch: str) -> str:
    """Normalise ``resnet18`` to ``torchvision.models.resnet18``."""
    return arch if "." in arch else f"torchvision.models.{arch}"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``model`` over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
