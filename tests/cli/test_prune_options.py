"""`tdump prune` options: -o/--output/--out, and --count beyond what can go (clamped, said)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tdump.surgery as surgery
from tests.cli.inproc import run_main
from tests.surgery.helpers import random_scores, write_ranks
from tests.surgery.nets import SmallNet

ARCH = ["--arch", "tests.surgery.nets.SmallNet", "--input-shape", "3,8,8", "--json"]


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    return run_main(monkeypatch, capsys, "prune", *args)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_count_too_large_is_clamped_and_said(
    scope: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = SmallNet()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ranks = write_ranks(tmp_path / "ranks.parquet", random_scores(model))
    flag = "--out" if scope == "global" else "--output"
    out = tmp_path / f"{scope}.pt"
    code, stdout, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "sd.pt"),
        str(ranks),
        *ARCH,
        "--count",
        "1000",
        "--scope",
        scope,
        flag,
        str(out),
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert 0 < summary["removed_channels"] < 1000
    said = " ".join(summary["notes"])
    assert "1000" in said and ("more than can be pruned" in said or "allow" in said)
    pruned = surgery.load(out, "tests.surgery.nets.SmallNet")
    # every group kept its minimum of one channel: the model still runs
    pruned(torch.randn(1, 3, 8, 8)).sum().backward()
    assert all(m.out_channels >= 1 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))


def test_pruned_state_dict_without_like(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fine-tuned pruned state_dict and no --like: the shapes are inferred (and said)."""
    model = SmallNet()
    small, _ = surgery.prune(model, random_scores(model), ratio=0.3)
    torch.save(small.state_dict(), tmp_path / "ft.pt")
    ranks = write_ranks(tmp_path / "ranks.parquet", random_scores(small, seed=1))
    out = tmp_path / "p.pt"
    code, stdout, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "ft.pt"),
        str(ranks),
        *ARCH,
        "--count",
        "2",
        "-o",
        str(out),
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert any("pruned shapes inferred" in n for n in summary["notes"])
    assert summary["params_before"] == surgery.count_params(small)
    again = surgery.load(out, "tests.surgery.nets.SmallNet")
    assert surgery.count_params(again) == summary["params_after"] < summary["params_before"]
    again(torch.randn(1, 3, 8, 8)).sum().backward()
