"""What the traced step's reading of the dataflow costs: the sum walk and the pre-activation pick.

Capture follows each call's first argument back through additions only on the first
saved step of each mode (``sum_of``), and at the end of that step's forward pass reads
its calls to add the pre-activations of the layers no activation module carries
(``include_activations``; docs/capture.md). For a few torchvision models (random
weights, batch 8 at 64x64) this times every call of that walk
(``SavedStep._summands``) and the pick (``StepLifecycle._select_unreached``) during
the first, traced step under a ``Hook`` with the seed's ReLU selection and
``include_activations``, and prints them against the whole step (forward, backward,
the hook's copies). Later steps do neither.

    python benchmarks/sum_walk.py --save benchmarks/results/sum_walk.txt
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import tdump.capture._step as step_mod
from tdump.capture import Hook
from tdump.capture._lifecycle import StepLifecycle

MODELS = ("resnet50", "regnet_y_400mf", "resnet152", "mobilenet_v2", "densenet121")


def measure(name: str, out: Path) -> tuple[int, float, int, float, float]:
    """``(calls walked, walk s, outputs added, pick s, traced step s)`` for model ``name``."""
    spent = [0, 0.0]
    picked = [0.0]
    walk = step_mod.SavedStep._summands
    pick = StepLifecycle._select_unreached

    def timed_pick(self: Any, cur: Any, tail: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            pick(self, cur, tail)
        finally:
            picked[0] += time.perf_counter() - t0

    def timed(self: Any, first: torch.Tensor, result: torch.Tensor | None) -> Any:
        t0 = time.perf_counter()
        try:
            return walk(self, first, result)
        finally:
            spent[0] += 1
            spent[1] += time.perf_counter() - t0

    step_mod.SavedStep._summands = timed  # type: ignore[method-assign]
    StepLifecycle._select_unreached = timed_pick  # type: ignore[method-assign]
    try:
        torch.manual_seed(0)
        model, loss_fn = torchvision.models.get_model(name, num_classes=10), nn.CrossEntropyLoss()
        x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
        with Hook(str(out), include_regex=".*relu|.*act", include_activations=True) as hook:
            hook.register_module(model)
            hook.register_loss(loss_fn)
            t0 = time.perf_counter()
            loss_fn(model(x), y).backward()
            traced = time.perf_counter() - t0
        return spent[0], spent[1], len(hook.added), picked[0], traced
    finally:
        step_mod.SavedStep._summands = walk  # type: ignore[method-assign]
        StepLifecycle._select_unreached = pick  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", type=Path, help="also append the table to this file")
    args = p.parse_args()
    torch.set_num_threads(2)
    lines = [
        f"# sum_walk.py, {time.strftime('%Y-%m-%d')}, {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, 2 threads"
    ]
    lines.append(
        f"{'model':16} {'walked':>6} {'walk ms':>8} {'added':>5} {'pick ms':>8} "
        f"{'traced step ms':>15} {'share':>6}"
    )
    tmp = Path(tempfile.mkdtemp())
    try:
        for name in MODELS:
            walked, walk, added, pick, traced = measure(name, tmp / f"{name}.zarr")
            lines.append(
                f"{name:16} {walked:6d} {walk * 1e3:8.1f} {added:5d} {pick * 1e3:8.1f} "
                f"{traced * 1e3:15.0f} {(walk + pick) / traced:6.2%}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.save:
        with args.save.open("a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
