"""What the built-in rules read and report: tensor_regex narrows (never widens) a rule's
selection, accuracy_drop picks its source per mode, a mode the dump lacks is an error
offline (waited for live), and a windowed rule that never filled its window says so.

Dumps hold exact values (StoreWriter); expected numbers are recomputed here with numpy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tdump.analyze import check, watch
from tdump.analyze._trial import Trial
from tdump.analyze.rules import AccuracyDrop, ExplodingTensor, VanishingGradient
from tdump.analyze.rules import WeightUpdateRatio as WUR
from tdump.errors import ConfigError
from tests.analyze.rules_helpers import tensor, write

RNG = np.random.default_rng(7)


def _mixed(path: str, steps: int = 3) -> dict[str, list[np.ndarray]]:
    """Weights, biases, gradients, running stats and a scalar, as a Conv-BN net saves them."""
    names = {
        "conv1.weight": "weights",
        "fc.weight": "weights",
        "fc.bias": "biases",
        "bn1.running_mean": "running_stats",
        "fc.weight.grad": "gradients",
        "fc.bias.grad": "gradients",
        "conv1.weight.grad": "gradients",
        "scalars.lr": "scalars",
    }
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    base = RNG.standard_normal((3, 3)).astype("f4")
    for i in range(steps):
        values["conv1.weight"].append(base)  # frozen: update ratio 0
        values["fc.weight"].append((base + 0.01 * i).astype("f4"))
        values["fc.bias"].append(np.full(3, 1.0 + i, "f4"))
        # running stats swing by 1000x: an update ratio far above `large`
        values["bn1.running_mean"].append(np.full(3, 1000.0**i, "f4"))
        values["fc.weight.grad"].append(RNG.standard_normal((3, 3)).astype("f4"))
        values["fc.bias.grad"].append(np.full(3, 1e-9, "f4"))
        values["conv1.weight.grad"].append(np.zeros((3, 3), "f4"))
        values["scalars.lr"].append(np.float64(1e9))
    write(
        path,
        {
            "train": [
                (10 * i, {n: tensor(c, values[n][i], n.split(".")[0]) for n, c in names.items()})
                for i in range(steps)
            ]
        },
    )
    return values


def test_tensor_regex_narrows_every_selecting_rule(tmp_path: Path) -> None:
    path = str(tmp_path / "mixed.zarr")
    v = _mixed(path)
    trial = Trial(path)
    # weight_update_ratio: only weights, with or without a regex
    assert WUR(trial).needed() == ["conv1.weight", "fc.weight"]
    assert WUR(trial, tensor_regex=r"^(?!conv1)").needed() == ["fc.weight"]
    assert check(path, ["weight_update_ratio"], params={"tensor_regex": r"^(?!conv1)"}) == []
    hits = check(path, ["weight_update_ratio"])  # the frozen conv1 fires `small`
    assert [f.step for f in hits] == [10, 20] and "conv1.weight: ||dw||/||w|| 0" in hits[0].why
    w = [x.astype("f8") for x in v["fc.weight"]]
    ratio = np.linalg.norm(w[1] - w[0]) / (np.linalg.norm(w[0]) + 1e-9)
    fired = check(
        path, ["weight_update_ratio"], params={"tensor_regex": "^fc", "large": ratio * 0.9}
    )
    assert f"fc.weight: ||dw||/||w|| {ratio:.3g} since step 0" in fired[0].why
    assert "running_mean" not in fired[0].why and ".grad" not in fired[0].why
    # vanishing_gradient: gradients of weights only; the regex narrows them
    assert VanishingGradient(trial).needed() == ["conv1.weight.grad", "fc.weight.grad"]
    assert VanishingGradient(trial, tensor_regex="^(fc|bn)").needed() == ["fc.weight.grad"]
    assert VanishingGradient(trial, biases=True, tensor_regex="^(fc|bn)").needed() == [
        "fc.bias.grad",
        "fc.weight.grad",
    ]
    # exploding_tensor: a regex matching a scalar does not add the scalars collection
    assert ExplodingTensor(trial, tensor_regex="lr|fc.bias$").needed() == ["fc.bias"]
    assert check(path, ["exploding_tensor"], params={"tensor_regex": "lr"}) == []


def test_vanishing_gradient_leaves_biases_out(tmp_path: Path) -> None:
    path = str(tmp_path / "mixed.zarr")
    v = _mixed(path)
    hits = check(path, ["vanishing_gradient"])
    assert [f.step for f in hits] == [0, 10, 20]
    assert hits[0].why == "1 gradient(s) below 1e-07: conv1.weight.grad: mean |g| 0"
    hits = check(path, ["vanishing_gradient"], params={"biases": True})
    bias = float(np.mean(np.abs(v["fc.bias.grad"][0].astype("f8"))))
    assert bias < 1e-7 and f"fc.bias.grad: mean |g| {bias:.3g}" in hits[0].why
    with pytest.raises(ConfigError, match="parameter biases must be true or false, got 'yes'"):
        check(path, ["vanishing_gradient"], params={"biases": "yes"})


# ------------------------------------------------------------------ accuracy_drop per mode
def _acc_dump(path: str, scalar_mode: str) -> list[float]:
    """4 eval records with loss inputs, train records, ``scalars.accuracy`` in ``scalar_mode``."""
    evals, accs = [], []
    for i in range(4):
        labels = RNG.integers(0, 3, 20)
        logits = RNG.standard_normal((20, 3)).astype("f4")
        accs.append(float(np.mean(np.argmax(logits, 1) == labels)))
        evals.append(
            (
                i,
                {
                    "loss.input_0.0": tensor("loss_inputs", logits, "loss"),
                    "loss.input_0.1": tensor("loss_inputs", labels, "loss"),
                },
            )
        )
    train = [(0, {"fc.weight": tensor("weights", np.ones((2, 2), "f4"))})]
    scalar = [(0, {"scalars.accuracy": tensor("scalars", np.float64(0.97), "")})]
    records = {"train": train, "eval": evals}
    if scalar_mode == "eval":
        records["eval"] = [(s, {**t, **scalar[0][1]}) for s, t in evals]
    else:
        records[scalar_mode] = scalar
    write(path, records)
    return accs


def test_accuracy_drop_uses_each_modes_own_source(tmp_path: Path) -> None:
    path = str(tmp_path / "global_scalar.zarr")
    accs = _acc_dump(path, "global")
    # eval has loss inputs and no scalar: they are read, with --mode eval or by default
    for params in ({"mode": "eval"}, {}):
        rule = AccuracyDrop(Trial(path), **params)
        assert (rule.mode, rule.source) == ("eval", "loss.input_0.0 vs loss.input_0.1")
        assert [rule.accuracy(s) for s in range(4)] == pytest.approx(accs)
    hits = check(path, ["accuracy_drop"], params={"baseline": 1.0}, mode="eval")
    assert [(f.step, f.mode) for f in hits] == [(0, "eval"), (1, "eval"), (2, "eval"), (3, "eval")]
    assert f"accuracy {accs[0]:.4f} is {1 - accs[0]:.4f} below baseline 1.0000" in hits[0].why
    # the global scalar where it lives (0.97: 0.03 below 1.0, under a 0.01 threshold fires)
    params = {"baseline": 1.0, "threshold": 0.01, "mode": "global"}
    hits = check(path, ["accuracy_drop"], params=params)
    assert [(f.step, f.mode) for f in hits] == [(0, "global")]
    assert "accuracy 0.9700 is 0.0300 below baseline 1.0000" in hits[0].why
    assert check(path, ["accuracy_drop"], params={**params, "threshold": 0.05}) == []
    # a mode with the scalar uses it (not the loss inputs it also has)
    both = str(tmp_path / "eval_scalar.zarr")
    _acc_dump(both, "eval")
    rule = AccuracyDrop(Trial(both))
    assert (rule.mode, rule.source, rule.accuracy(2)) == ("eval", "scalars.accuracy", 0.97)


# ------------------------------------------------------------------ modes the dump lacks
def test_a_mode_the_dump_lacks_is_an_error_offline_and_waited_for_live(tmp_path: Path) -> None:
    path = str(tmp_path / "g.zarr")
    _acc_dump(path, "global")
    msg = "has no saved 'evl' steps; modes present: train, eval, global"
    with pytest.raises(ConfigError, match=msg):
        check(path, ["exploding_tensor", "dead_relu"], mode="evl")
    with pytest.raises(ConfigError, match=msg):
        check(path, ["exploding_tensor", "dead_relu"], params={"dead_relu.mode": "evl"})
    # live: the mode may not exist yet; the watcher waits, then ends on its idle timeout
    t0 = time.monotonic()
    assert watch(path, ["exploding_tensor"], mode="test", poll=0.05, timeout=0.3) == []
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------ windowed rules
def test_an_unfilled_window_is_reported_not_counted(tmp_path: Path) -> None:
    path = str(tmp_path / "short.zarr")
    losses = [2.2, 2.1, 2.3, 40.0, 900.0, 1e4, 5e4, 1.4e5]
    write(
        path,
        {
            "train": [
                (5 * i, {"loss.output_0": tensor("losses", np.float32(v), "loss")})
                for i, v in enumerate(losses)
            ]
        },
    )
    seen: dict[str, int] = {}
    notes: dict[str, str] = {}
    assert check(path, ["loss_not_decreasing"], evaluated=seen, notes=notes) == []
    assert seen == {"loss_not_decreasing": 0}
    assert notes["loss_not_decreasing"] == (
        "needs 10 saved steps (2 x window 5) of loss.output_0 (train), the dump has 8: "
        "set -p window=N with N <= 4"
    )
    # window 4 fills at the 8th saved step only: 1 step checked, and it fires
    seen.clear()
    hits = check(path, ["loss_not_decreasing"], params={"window": 4}, evaluated=seen)
    assert [f.step for f in hits] == [35] and seen == {"loss_not_decreasing": 1}
    # weight_update_ratio: the first saved step compares nothing and is not counted
    wpath = str(tmp_path / "w.zarr")
    _mixed(wpath, steps=1)
    notes.clear()
    seen.clear()
    assert check(wpath, ["weight_update_ratio"], evaluated=seen, notes=notes) == []
    assert seen == {"weight_update_ratio": 0}
    assert notes["weight_update_ratio"].startswith("needs 2 saved steps of a weight (train)")
