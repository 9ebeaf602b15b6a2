"""`tdump check DUMP` on a script whose loss is a function (``F.cross_entropy``).

Capture stores a loss module's value and inputs; a functional loss leaves the dump
without them. Before, the default `tdump check DUMP` stopped at `accuracy_drop` with an
error and checked nothing else. Now each rule lacking its data says what to add, the
other rules run, and following that advice makes both rules check steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tdump.capture
from tdump.analyze.rules import builtin_rules
from tdump.cli.app import main


def _train(path: Path, *, record_loss: bool) -> None:
    """Four saved SGD steps and one evaluation of a small CNN, the loss a function."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with tdump.capture.Hook(
        str(path), include_regex=".*weight", include_activations=True, save_interval=1, strict=True
    ) as hook:
        hook.register_module(model)
        for _ in range(4):
            x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            if record_loss:
                tdump.capture.record_loss(loss, logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            logits = model(x)
            if record_loss:
                tdump.capture.record_loss(nn.functional.cross_entropy(logits, y), logits, y)


def _check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, dump: Path, *args: str
) -> tuple[int, dict]:
    monkeypatch.setattr(sys, "argv", ["tdump", "check", str(dump), "--json", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), json.loads(capsys.readouterr().out)


def test_every_rule_runs_and_the_missing_loss_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dump = tmp_path / "f.zarr"
    _train(dump, record_loss=False)
    code, report = _check(capsys, monkeypatch, dump)
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert code == 0 and list(by_rule) == builtin_rules()
    assert all(r["error"] is None for r in by_rule.values())
    for rule in ("accuracy_drop", "loss_not_decreasing"):
        note = by_rule[rule]["note"]
        assert by_rule[rule]["steps_checked"] == 0 and "record_loss(loss, logits, y)" in note
    assert by_rule["exploding_tensor"]["steps_checked"] == 4  # the others were checked

    # the advice followed: both rules now read the recorded loss and its inputs
    fixed = tmp_path / "fixed.zarr"
    _train(fixed, record_loss=True)
    code, report = _check(capsys, monkeypatch, fixed, "-p", "loss_not_decreasing.window=2")
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert by_rule["accuracy_drop"]["steps_checked"] == 1
    assert by_rule["loss_not_decreasing"]["steps_checked"] == 1  # step 3: two windows of 2


def test_a_named_source_that_is_missing_is_still_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the rule's own choice of source is a note; a name the user gave must exist."""
    dump = tmp_path / "f.zarr"
    _train(dump, record_loss=False)
    monkeypatch.setattr(
        sys, "argv", ["tdump", "check", str(dump), "-r", "accuracy_drop", "-p", "scalar=acc"]
    )
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 1 and "scalars.acc" in err and len(err.strip().splitlines()) == 1
