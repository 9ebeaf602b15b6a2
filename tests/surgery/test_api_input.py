"""Wrong arguments to the surgery's Python API: one-line tdump errors, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tdump
from tdump import surgery
from tdump.errors import ConfigError, RanksError
from tests.surgery.nets import TinyNet


def test_prune_refuses_paths_state_dicts_and_odd_ranks(tmp_path: Path) -> None:
    model = TinyNet()
    scores = {"conv1": np.arange(8.0)}
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    for wrong in (str(tmp_path / "ckpt.pt"), model.state_dict()):
        with pytest.raises(ConfigError, match=r"prune takes the model .* tdump\.load\(path\)"):
            surgery.prune(wrong, scores, count=2)  # type: ignore[arg-type]
    for ranks in (None, 5):
        with pytest.raises(RanksError, match=r"ranks must be a ranks\.parquet path"):
            surgery.prune(model, ranks, count=2)  # type: ignore[arg-type]
    with pytest.raises(RanksError, match=r"one number per output channel \(1-d\).* shape \(2, 4\)"):
        surgery.prune(model, {"conv1": np.zeros((2, 4))}, count=2)


def test_non_finite_scores_are_refused_not_pruned_arbitrarily() -> None:
    model = TinyNet()
    for scores in (np.full(8, np.nan), np.array([np.nan, 0, 1, 2, 3, 4, 5, np.inf])):
        with pytest.raises(RanksError, match=r"[28] of layer 'conv1''s 8 channels"):
            surgery.prune(model, {"conv1": scores}, count=2)
    small, _ = surgery.prune(model, {"conv1": np.arange(8.0)}, count=2)  # finite: pruned
    assert small.conv1.out_channels == 6


def test_save_with_swapped_arguments_says_so(tmp_path: Path) -> None:
    model = TinyNet()
    out = tmp_path / "m.pt"
    with pytest.raises(ConfigError, match=r"tdump\.save takes \(model, path\)"):
        tdump.save(str(out), model)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"tdump\.surgery\.save takes \(path, model\)"):
        surgery.save(model, str(out))  # type: ignore[arg-type]
    assert not out.exists()
