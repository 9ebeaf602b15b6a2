"""The pickle-free checkpoint: save, load, prune again, input checkpoint kinds, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.errors import CheckpointError, FormatVersionError
from tests.surgery.helpers import random_scores

ARCH = "torchvision.models.resnet18"


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_prune_save_load_prune_load(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = surgery.load(tmp_path / "sd.pt", ARCH, {"num_classes": 7})
    _same(loaded, model)

    one, _ = surgery.prune(loaded, random_scores(loaded, 1), ratio=0.3, round_to=4)
    surgery.save(tmp_path / "r1.pt", one)
    raw = torch.load(tmp_path / "r1.pt", weights_only=True)
    assert raw["format"] == "tdump.checkpoint" and raw["format_version"] == 1 and raw["rounds"] == 1
    assert raw["arch"] == ARCH and raw["arch_kwargs"] == {"num_classes": 7}
    r1 = surgery.load(tmp_path / "r1.pt")
    _same(r1, one)

    two, plan2 = surgery.prune(r1, random_scores(r1, 2), count=50)
    surgery.save(tmp_path / "r2.pt", two)
    r2 = surgery.load(tmp_path / "r2.pt")
    _same(r2, two)
    raw2 = torch.load(tmp_path / "r2.pt", weights_only=True)
    assert raw2["rounds"] == 2
    # the cumulative plan indexes the ORIGINAL channels: its filters are the original's rows
    keep = raw2["plan"]["layer1.0.conv1"]["keep"]
    assert (
        raw2["plan"]["layer1.0.conv1"]["channels"] == 64
        and len(keep) == r2.layer1[0].conv1.out_channels
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(r2.eval()(x), two.eval()(x))
    assert plan2.removed == 50


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_loads_in_the_dtypes_it_was_saved_in(dtype: torch.dtype, tmp_path: Path) -> None:
    """A bfloat16 model pruned and saved loads as one (not float32 where shapes stayed)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    pruned, _ = surgery.prune(model, random_scores(model, 0), ratio=0.3)
    pruned = pruned.to(dtype).eval()
    pruned.bn1.float()  # a norm kept in float32 inside a low-precision model stays so
    with torch.no_grad():  # values float32 cannot hold, so a cast on the way would show
        pruned.fc.bias.add_(torch.full_like(pruned.fc.bias, 1e-12))
    surgery.save(tmp_path / "p.pt", pruned, arch=ARCH, arch_kwargs={"num_classes": 5})
    back = surgery.load(tmp_path / "p.pt").eval()
    dtypes = {k: v.dtype for k, v in back.state_dict().items()}
    assert dtypes == {k: v.dtype for k, v in pruned.state_dict().items()}
    _same(back, pruned)


def test_conv_rows_come_from_original(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=3)
    scores = {"layer2.0.conv1": np.arange(128.0)}
    one, _ = surgery.prune(model, scores, count=28)
    surgery.save(tmp_path / "a.pt", one, arch=ARCH, arch_kwargs={"num_classes": 3})
    back = surgery.load(tmp_path / "a.pt")
    two, _ = surgery.prune(back, {"layer2.0.conv1": -np.arange(100.0)}, count=10)
    keep = np.arange(28, 128)[np.arange(100)[:-10]]
    torch.testing.assert_close(
        two.layer2[0].conv1.weight, model.layer2[0].conv1.weight[keep], rtol=0, atol=0
    )
    torch.testing.assert_close(
        two.layer2[0].conv2.weight, model.layer2[0].conv2.weight[:, keep], rtol=0, atol=0
    )


def test_input_kinds(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=5)
    torch.save(
        {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
        tmp_path / "ddp.pt",
    )
    _same(surgery.load(tmp_path / "ddp.pt", ARCH, {"num_classes": 5}), model)
    torch.save(
        {"state_dict": model.state_dict(), "arch": ARCH, "arch_kwargs": {"num_classes": 5}},
        tmp_path / "w.pt",
    )
    _same(surgery.load(tmp_path / "w.pt"), model)


def test_refusals(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=5)
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match=r"weights_only.*state_dict\(\)"):
        surgery.load(tmp_path / "full.pt", ARCH)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="plain state_dict"):
        surgery.load(tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"does not match torchvision\.models\.resnet34"):
        surgery.load(tmp_path / "sd.pt", "torchvision.models.resnet34", {"num_classes": 5})
    # the head's size is inferred from the state_dict (and said), not refused
    inferred = surgery.load(tmp_path / "sd.pt", ARCH)
    assert inferred.fc.out_features == 5
    assert any("num_classes=5" in n for n in surgery.provenance(inferred).notes)
    surgery.save(tmp_path / "t.pt", model, arch=ARCH, arch_kwargs={"num_classes": 5})
    raw = torch.load(tmp_path / "t.pt", weights_only=True)
    raw["format_version"] = 2
    torch.save(raw, tmp_path / "v2.pt")
    with pytest.raises(FormatVersionError, match="version 2"):
        surgery.load(tmp_path / "v2.pt")
