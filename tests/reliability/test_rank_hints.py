"""Layers left without scores are named with a reason, and the hint given is true:
recording what it says makes `tdump rank` score them (checked against numpy)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdump._format import StoreReader
from tdump.analyze import rank
from tests.analyze.rank_helpers import magnitude, reference
from tests.reliability.conftest import one_line_error, record_tiny


class FunctionalNet(nn.Module):
    """F.relu after the first conv, a residual block written ``self.act(y + x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        return self.fc(self.act(y + x).mean((2, 3)))


def test_functional_relu_and_residual_add(tmp_path: Path, run_cli: Any) -> None:
    torch.manual_seed(0)
    first = record_tiny(
        str(tmp_path / "a.zarr"), steps=2, model=FunctionalNet(), include=r".*relu|.*act"
    )
    line = one_line_error(run_cli("rank", first, "-o", str(tmp_path / "r.parquet")))
    assert "conv1, conv2" in line and "no activation module receives these channels" in line
    assert "--include '.*relu'" not in line  # the old hint, which cannot help
    hint = re.search(r"tdump record --include '([^']+)'", line)
    assert hint is not None, line
    # the whole selection to record with: what was recorded, plus what is missing
    assert hint[1].startswith(".*relu|.*act|"), line
    torch.manual_seed(0)
    second = record_tiny(str(tmp_path / "b.zarr"), steps=2, model=FunctionalNet(), include=hint[1])
    df = rank(second, progress=False)
    reader = StoreReader(second)
    for layer, sources in df.groupby("layer")["sources"].first().items():
        assert sources.split(",")[0] in {"bn1.output_0", "bn2.output_0"}, (layer, sources)
        want = reference(reader, "taylor", sources)
        got = df[df["layer"] == layer].sort_values("channel")["score"].to_numpy()
        # BN outputs are signed: the float32 sums' error is bounded by the scale of |a * g|
        atol = 1e-6 * float(magnitude(reader, sources).max())
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol)


def test_preactivation_equals_relu_taylor(tmp_path: Path) -> None:
    """The documented variant: for ReLU, Taylor on the pre-activation is the same term."""
    path = record_tiny(str(tmp_path / "d.zarr"), steps=2, include=r"^[1245]\.output")
    reader = StoreReader(path)
    for bn, relu in (("1.output_0", "2.output_0"), ("4.output_0", "5.output_0")):
        pre = reference(reader, "taylor", [bn, bn + ".grad"])
        post = reference(reader, "taylor", [relu, relu + ".grad"])
        np.testing.assert_allclose(pre, post, rtol=1e-6, atol=1e-12)


def test_one_saved_step_note(tmp_path: Path, run_cli: Any) -> None:
    path = record_tiny(str(tmp_path / "one.zarr"), steps=3, interval=100)
    res = run_cli("rank", path, "-o", str(tmp_path / "r.parquet"), "-q")
    assert res.code == 0, res.err
    assert "note: taylor scores rest on one saved step (step 0, the untrained model)" in res.err
