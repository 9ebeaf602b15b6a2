"""Which torchvision detection models the surgery prunes exactly, traced in parts.

For every model of ``torchvision.models.list_models(module=torchvision.models.detection)``:
random weights (no download: ``weights_backbone=None``), 5 classes, every box kept (score
threshold 0), L1 ranks from the weights, ``ratio=0.3`` global, and float64 equivalence
of the detections (boxes and scores after NMS, one 128x160 image) against the unpruned
model with the removed channels taken out by forward hooks (``tests/surgery/zoo.py``,
independent of the channel graph). Prints one row per model: parameters before ->
after, groups free to prune, the largest absolute difference, the traced parts.

Run: ``.venv/bin/python benchmarks/coverage_detection.py [NAME ...]``
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.surgery.zoo

import tdump.surgery as surgery
from tests.surgery import zoo


def _kwargs(name: str) -> dict[str, Any]:
    thresh = "box_score_thresh" if "rcnn" in name else "score_thresh"
    return {"num_classes": 5, thresh: 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    names = parser.parse_args().models or torchvision.models.list_models(
        module=torchvision.models.detection
    )
    warnings.simplefilter("ignore", surgery.FewChannelsWarning)
    print(f"torch {torch.__version__}, ratio 0.3 global, {len(names)} models, float64")
    passed = 0
    for name in names:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = surgery.build_arch(f"torchvision.models.detection.{name}", _kwargs(name))
        model = model.double().eval()
        graph = surgery.build_graph(model)
        free = sum(not g.frozen for g in graph.groups)
        pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3)
        images = [torch.rand(3, 128, 160, dtype=torch.float64)]
        ref = zoo.detections(zoo.reference_output(model, plan, images))
        with torch.no_grad():
            got = zoo.detections(pruned.eval()(images))
        diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
        ok = diff < 1e-9 and ref.numel() > 0
        passed += ok
        before = sum(p.numel() for p in model.parameters()) / 1e6
        after = sum(p.numel() for p in pruned.parameters()) / 1e6
        print(
            f"{name:38s} {before:6.2f}M -> {after:6.2f}M  free groups {free:3d}  "
            f"max |diff| {diff:.1e} over {ref.numel()} values  {time.perf_counter() - start:5.1f}s  "
            f"{'ok' if ok else 'FAIL'}  parts: {', '.join(p.rstrip('.') for p in graph.parts)}",
            flush=True,
        )
    print(f"pruned exactly: {passed} of {len(names)}")


if __name__ == "__main__":
    main()
