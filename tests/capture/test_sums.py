"""The ``sum_of`` a traced call records: which module outputs a residual ``+`` added up."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tdump._format import StoreReader
from tdump.capture import Hook


class Joins(nn.Module):
    """Two conv branches joined four ways: ``+`` into a ReLU module, ``+`` through a
    bfloat16 cast, a product and a concatenation (only a sum ties channels one to one)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.add = nn.ReLU()
        self.cast = nn.Identity()
        self.mul = nn.ReLU()
        self.cat = nn.ReLU()
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.a(x), self.b(x), self.c(x)
        added = self.add(a + b + c + self.bias + 1.0)  # a leaf and a constant add no call
        cast = self.cast(a.to(torch.bfloat16) + b.to(torch.bfloat16))
        mul = self.mul(a * b)
        cat = self.cat(torch.cat([a, b], 1))
        return added.sum() + cast.float().sum() + mul.sum() + F.relu(cat).sum()


def _calls(tmp_path: Path, grad: bool = True) -> dict[str, dict]:
    out = tmp_path / "d.zarr"
    torch.manual_seed(0)
    model = Joins()
    with Hook(str(out), include_regex=".*", strict=True) as hook:
        hook.register_module(model)
        with torch.set_grad_enabled(grad):
            loss = model(torch.randn(2, 3, 4, 4))
            if grad:
                loss.backward()
    reader = StoreReader(str(out))
    (mode,) = reader.modes()
    return {c["name"]: c for c in reader.meta()["calls"][mode]}


def test_sums_name_the_calls_they_add_and_nothing_else(tmp_path: Path) -> None:
    calls = _calls(tmp_path)
    assert calls["add.output_0"]["sum_of"] == ["a.output_0", "b.output_0", "c.output_0"]
    assert calls["add.output_0"]["inputs"] == [None]  # a non-module operation made it
    assert calls["cast.output_0"]["sum_of"] == ["a.output_0", "b.output_0"]
    for name in ("mul.output_0", "cat.output_0", "a.output_0", "b.output_0"):
        assert "sum_of" not in calls[name], name


def test_inplace_activation_sees_the_sum_it_overwrote(tmp_path: Path) -> None:
    """``out += skip; relu_(out)``, as torchvision's ResNet: the ReLU's argument is the
    sum it overwrites in place; the sum is still found, and its producer kept."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.skip = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.keep = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn(self.conv(x))
            out += self.skip(x)
            kept = self.keep(self.relu(out))  # returns the ReLU's output as it came
            return self.relu(kept + 0.0)  # the second call sums one call's output

    out = tmp_path / "d.zarr"
    block = Block()
    with Hook(str(out), include_regex=".*relu", strict=True) as hook:
        hook.register_module(block)
        block(torch.randn(2, 3, 4, 4)).sum().backward()
    calls = {c["name"]: c for c in StoreReader(str(out)).meta()["calls"]["train"]}
    first = calls["relu.output_0"]
    assert first["inputs"] == ["bn.output_0"] and first["sum_of"] == [
        "bn.output_0",
        "skip.output_0",
    ]
    assert "sum_of" not in calls["relu.output_1"]
    # the Identity's argument is the ReLU's output, not the sum the ReLU read
    assert calls["keep.output_0"]["inputs"] == ["relu.output_0"]
    assert "sum_of" not in calls["keep.output_0"]


def test_no_grad_records_no_sums(tmp_path: Path) -> None:
    """Without autograd there is no graph to follow: the calls are as before."""
    calls = _calls(tmp_path, grad=False)
    assert calls["add.output_0"]["inputs"] == [None]
    assert not any("sum_of" in c for c in calls.values())
