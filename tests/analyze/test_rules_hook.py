"""Rules on dumps the real capture Hook wrote from a tiny convnet: a healthy run and a sick one.

The sick run is the healthy one with faults injected at known steps: after train
step 4, eval step 2 runs with a classifier bias that forces one class; from train
step 5 ``bn1.bias = -100`` (every ``relu.output_0`` value is 0, no gradient reaches
conv1/bn1); at train step 7 a NaN in ``fc.weight``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tdump.analyze import check
from tdump.capture import Hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "capture" / "scripts"))
from train_tiny import TinyNet

ROOT = Path(__file__).resolve().parents[2]
CHECK_ACCURACY = str(ROOT / "examples" / "rules" / "check_accuracy.py")


def _run(path: str, sick: bool) -> list[float]:
    """Train 8 steps on one fixed batch, evaluate 3 times after step 4; eval accuracies."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet()
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    accs = []
    include = r"relu\.output_0$|weight|bias"  # (and their gradients, the loss and its inputs)
    with Hook(path, include_regex=include, save_interval=1, strict=True) as hook:
        hook.register_module(model).register_loss(crit)
        for step in range(8):
            if step == 5:
                model.eval()
                with torch.no_grad():
                    for k in range(3):
                        saved = model.fc.bias.detach().clone()
                        if sick and k == 2:
                            rare = int(torch.bincount(y, minlength=4).argmin())
                            model.fc.bias.data[rare] = 100.0
                        logits = model(x)
                        crit(logits, y)
                        accs.append(float((logits.argmax(1) == y).float().mean()))
                        model.fc.bias.data.copy_(saved)
                model.train()
            if sick and step == 5:
                model.bn1.bias.data.fill_(-100.0)
            if sick and step == 7:
                model.fc.weight.data[0, 0] = float("nan")
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    return accs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hook_rules")
    out: dict[str, Any] = {}
    for name in ("healthy", "sick"):
        path = str(base / f"{name}.zarr")
        out[name] = (path, _run(path, sick=name == "sick"))
    return out


RULES = [
    "vanishing_gradient",
    "exploding_tensor",
    "dead_relu",
    "loss_not_decreasing",
    "weight_update_ratio",
    "accuracy_drop",
]


def test_healthy_run_fires_nothing(runs: dict[str, Any]) -> None:
    path, accs = runs["healthy"]
    assert accs[0] == accs[1] == accs[2]
    firings = check(path, RULES, params={"loss_not_decreasing.window": 2})
    assert firings == []


def test_sick_run_first_bad_steps(runs: dict[str, Any]) -> None:
    path, accs = runs["sick"]
    firings = check(path, RULES, params={"loss_not_decreasing.window": 2})
    assert not [f for f in firings if f.error], firings
    first = {}
    for f in firings:
        first.setdefault(f.rule, f)
    assert (
        first["dead_relu"].step == 5
        and "relu.output_0: 100% of 8 channels dead" in first["dead_relu"].why
    )
    # nothing reaches conv1, bn1 and (zero input, normalised to 0) conv2 / bn2.weight
    vanish = first["vanishing_gradient"]
    # bn1's own bias is read by default (no norm follows bn1), and also 0
    assert vanish.step == 5 and vanish.why.startswith(
        "5 gradient(s) below 1e-07: bn1.bias.grad: mean |g| 0;"
    )
    # biases=false leaves every bias out
    no_biases = check(path, ["vanishing_gradient"], params={"biases": False})
    assert no_biases[0].step == 5 and no_biases[0].why.startswith(
        "4 gradient(s) below 1e-07: bn1.weight.grad: mean |g| 0;"
    )
    # no gradient reached conv1 at step 5, so its weight at step 6 equals that at step 5
    assert (
        first["weight_update_ratio"].step == 6
        and "conv1.weight: ||dw||/||w|| 0 since step 5" in first["weight_update_ratio"].why
    )
    assert first["exploding_tensor"].step == 7 and "NaN" in first["exploding_tensor"].why
    only_fc = check(path, ["exploding_tensor"], params={"tensor_regex": r"^fc\.weight$"})
    assert [(f.step, f.why) for f in only_fc] == [(7, "fc.weight: 1 NaN, 0 Inf")]
    drop = first["accuracy_drop"]
    assert (drop.step, drop.mode) == (2, "eval") and accs[0] - accs[2] > 0.05
    assert (
        f"accuracy {accs[2]:.4f} is {accs[0] - accs[2]:.4f} below baseline {accs[0]:.4f}"
        in drop.why
    )


@pytest.mark.parametrize("name", ["healthy", "sick"])
def test_seed_check_accuracy_rule_file(runs: dict[str, Any], name: str) -> None:
    path, accs = runs[name]
    firings = check(
        path,
        [f"{CHECK_ACCURACY}:CheckAccuracy"],
        params={"previous_accuracy": accs[0], "threshold": 0.05},
    )
    if name == "healthy":
        assert firings == []
    else:
        assert [(f.rule, f.step, f.mode) for f in firings] == [("CheckAccuracy", 2, "eval")]
        assert f"accuracy {accs[2]:.4f} fell {accs[0] - accs[2]:.4f}" in firings[0].why
        # a threshold above the fall: silent
        params = {"previous_accuracy": accs[0], "threshold": accs[0] - accs[2] + 0.01}
        assert check(path, [f"{CHECK_ACCURACY}:CheckAccuracy"], params=params) == []
    assert np.isclose(accs[1], accs[0])
