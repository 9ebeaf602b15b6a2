"""tdump.report and the metrics the loop reads from a dump (in-process, real stores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tdump
from tdump.capture import Hook
from tdump.loop import dump_metrics


def test_report_without_a_hook_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    tdump.report(accuracy=0.5, loss=torch.tensor(1.0), bad="x")
    assert capsys.readouterr() == ("", "")


def test_report_and_loss_inputs_give_the_round_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 3, 6, 6), torch.randint(0, 3, (12,))
    path = tmp_path / "d.zarr"
    logits_seen, losses = [], []
    with Hook(str(path), save_interval=1, strict=True) as hook:
        hook.register_module(model)
        hook.register_loss(crit)
        for i in range(3):
            opt.zero_grad()
            crit(model(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(3):  # an eval pass in three batches of 4
                out = model(x[4 * i : 4 * i + 4])
                losses.append(float(crit(out, y[4 * i : 4 * i + 4])))
                logits_seen.append(out)
        tdump.report(accuracy=0.25, loss=torch.tensor(0.75), note=float("nan"))
        tdump.report(accuracy=0.5)  # the last report wins
    m = dump_metrics(path)
    assert m["source"] == "report" and m["accuracy"] == 0.5 and m["loss"] == 0.75
    assert m["reported"] == {"accuracy": 0.5, "loss": 0.75}  # nan skipped
    logits = torch.cat(logits_seen).numpy()
    assert m["eval_accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == y.numpy())))
    assert m["eval_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-6)
    assert m["train_accuracy"] is not None and 0 <= m["train_accuracy"] <= 1
    trial = tdump.Trial(path)
    assert trial.steps("global") == [0, 1]
