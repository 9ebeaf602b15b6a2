"""All 80 torchvision classifiers: prune, exact equivalence, checkpoint round trip, training step.

The checks live in ``tests/surgery/zoo.py`` (shared with ``benchmarks/coverage.py``,
whose output, ``benchmarks/results/coverage.txt``, has the full table for both scopes).
To keep the suite's time down, every model is pruned with the global scope and
checked for equivalence; one model per family (``FULL``) also gets the per-layer scope,
the checkpoint round trip and the training step. Models over 50 M parameters
(``HEAVY``, marked ``slow``) run in float32 (equivalence to 1e-4). The benchmark runs
every check on every model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.surgery.zoo import check, names

#: Over 50 M parameters (and maxvit_t, whose windows need a 224 input): float32, marked slow.
HEAVY = {
    "maxvit_t",
    "alexnet",
    "convnext_base",
    "convnext_large",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "regnet_x_16gf",
    "regnet_x_32gf",
    "regnet_y_16gf",
    "regnet_y_32gf",
    "regnet_y_128gf",
    "resnet152",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "swin_b",
    "swin_v2_b",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "wide_resnet50_2",
    "wide_resnet101_2",
}
#: One model per family gets every check in the suite (the benchmark: every model).
FULL = {
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",  # train-only auxiliary heads
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "swin_t",
    "swin_v2_t",
    "vit_b_32",
}
#: Models that cannot pass today, and exactly why.
KNOWN: dict[str, str] = {}


def _param(name: str) -> object:
    marks = [pytest.mark.slow] if name in HEAVY else []
    if name in KNOWN and name in FULL:
        marks.append(pytest.mark.xfail(reason=KNOWN[name], strict=False))
    return pytest.param(name, marks=marks, id=name)


def test_all_80_are_listed() -> None:
    assert len(names()) == 80


@pytest.mark.parametrize("name", [_param(n) for n in names()])
def test_prune_every_torchvision_classifier(name: str, tmp_path: Path) -> None:
    full = name in FULL
    results = check(
        name,
        tmp_path,
        scopes=("global", "per-layer") if full else ("global",),
        save_load=full,
        full=("global",) if full else (),
        dtype=torch.float32 if name in HEAVY else torch.float64,
    )
    for res in results:
        assert res.status == "ok", f"{res.scope}: {res.status}"
        assert res.params_after < res.params_before
