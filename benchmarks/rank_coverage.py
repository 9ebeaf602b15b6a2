"""How many convs ``tdump rank`` scores by ``taylor`` from ``tdump record``'s default selection.

Per torchvision model, two recordings of the same two train steps (batch 2, 64x64,
the Taylor term at the source, every step saved), ranked by ``taylor``:

- ``activations``: the outputs of the activation modules only (by name), what the
  default selection recorded before it added pre-activations;
- ``default``: ``include_activations``, which also records the pre-activation of each
  layer no activation module carries (docs/capture.md).

Prints per model the convs scored of all convs for each, the on-disk size of the same
two selections recorded as full tensors (``reduction=None``, what ``tdump record``
stores by default; the ratio is the default's bytes over the activations-only ones),
and the modules the default added. Run: ``.venv/bin/python
benchmarks/rank_coverage.py [NAME ...]`` (a few minutes).
"""

from __future__ import annotations

import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from tdump._modtypes import is_activation_type, type_name
from tdump.analyze import Trial, rank
from tdump.capture import Hook

MODELS = [
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "regnet_x_400mf",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
]


def _record(model: nn.Module, out: str, **options: object) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with Hook(out, save_interval=1, **{"reduction": "taylor", **options}) as hook:
        hook.register_module(model)
        for _ in range(2):
            model.zero_grad()
            logits = model(x)
            torch.nn.functional.cross_entropy(getattr(logits, "logits", logits), y).backward()


def _megabytes(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def _scored(out: str, convs: set[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = rank(out, criterion="taylor")
    return len(convs & set(table["layer"]))


def main(names: list[str]) -> None:
    print(
        f"{'model':<20} {'convs':>5} {'activations':>11} {'default':>7} "
        f"{'MB full: activations':>20} {'default':>7} {'ratio':>5}  added"
    )
    for name in names:
        model = torchvision.models.get_model(name, num_classes=10).train()
        convs = {p for p, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
        acts = [p for p, m in model.named_modules() if p and is_activation_type(type_name(type(m)))]
        by_name = r"^(?:" + "|".join(map(re.escape, acts)) + r")\.output_\d+"
        with tempfile.TemporaryDirectory() as tmp:
            before, after = str(Path(tmp, "a.zarr")), str(Path(tmp, "d.zarr"))
            _record(model, before, include_regex=by_name)
            _record(model, after, include_activations=True)
            added = sorted(
                {
                    n.split(".output_")[0]
                    for n in Trial(after).tensor_names()
                    if ".output_" in n and n.split(".output_")[0] not in acts
                }
            )
            row = (len(convs), _scored(before, convs), _scored(after, convs))
            full_before, full_after = str(Path(tmp, "fa.zarr")), str(Path(tmp, "fd.zarr"))
            _record(model, full_before, include_regex=by_name, reduction=None)
            _record(model, full_after, include_activations=True, reduction=None)
            mb = (_megabytes(full_before), _megabytes(full_after))
        shown = ", ".join(added[:3]) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        print(
            f"{name:<20} {row[0]:>5} {row[1]:>11} {row[2]:>7} {mb[0]:>20.1f} {mb[1]:>7.1f} "
            f"{mb[1] / mb[0]:>5.2f}  {shown or '-'}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS)
