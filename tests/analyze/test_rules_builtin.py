"""Each built-in rule on a dump made to trigger it (first bad step reported) and on a healthy one.

Dumps hold exact values (StoreWriter); expected numbers are recomputed here with numpy.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tdump.analyze import check
from tdump.analyze.rules import builtin_rules
from tests.analyze.rules_helpers import RELU_MODULES, tensor, write

RNG = np.random.default_rng(0)


def _fired(path: str, rule: str, **params: object) -> list[int]:
    firings = check(path, [rule], params=params)
    assert not [f for f in firings if f.error], firings
    return [f.step for f in firings]


def test_all_six_are_registered() -> None:
    assert builtin_rules() == [
        "accuracy_drop",
        "dead_relu",
        "exploding_tensor",
        "loss_not_decreasing",
        "vanishing_gradient",
        "weight_update_ratio",
    ]


# ------------------------------------------------------------------ vanishing_gradient
def _grads(path: str, scales: list[float]) -> list[np.ndarray]:
    values = [RNG.standard_normal((3, 4)).astype("f4") * s for s in scales]
    other = RNG.standard_normal((2, 2)).astype("f4")
    write(
        path,
        {
            "train": [
                (
                    10 * i,
                    {
                        "fc.weight.grad": tensor("gradients", g),
                        "c.weight.grad": tensor("gradients", other),
                    },
                )
                for i, g in enumerate(values)
            ]
        },
    )
    return values


def test_vanishing_gradient(tmp_path) -> None:
    sick = str(tmp_path / "sick.zarr")
    grads = _grads(sick, [1e-2, 1e-3, 1e-9, 1e-2, 1e-10])
    firings = check(sick, ["vanishing_gradient"])
    assert [f.step for f in firings] == [20, 40]
    mean = float(np.mean(np.abs(grads[2].astype("f8"))))
    assert mean < 1e-7 and f"fc.weight.grad: mean |g| {mean:.3g}" in firings[0].why
    healthy = str(tmp_path / "ok.zarr")
    _grads(healthy, [1e-2, 1e-3, 1e-6, 1e-2])
    assert _fired(healthy, "vanishing_gradient") == []
    # the threshold is a parameter: 1e-6 * mean|N(0,1)| ~ 8e-7 is below 1e-5
    assert _fired(healthy, "vanishing_gradient", threshold=1e-5) == [20]


# ------------------------------------------------------------------ exploding_tensor
@pytest.mark.parametrize(
    ("bad", "needle"), [(np.nan, "1 NaN"), (-np.inf, "1 Inf"), (3e7, "max |x| 3e+07")]
)
def test_exploding_tensor(tmp_path, bad: float, needle: str) -> None:
    recs = []
    for i in range(5):
        w = RNG.standard_normal((3, 4)).astype("f4")
        if i >= 3:
            w[1, 2] = bad
        labels = np.full(4, 7_000_000, "i8")  # integers are not checked (huge labels are fine)
        recs.append(
            (
                i,
                {
                    "fc.weight": tensor("weights", w),
                    "loss.input_0.1": tensor("loss_inputs", labels, "loss"),
                },
            )
        )
    path = str(tmp_path / "sick.zarr")
    write(path, {"train": recs})
    firings = check(path, ["exploding_tensor"])
    assert [f.step for f in firings] == [3, 4]
    assert firings[0].why.startswith("fc.weight: ") and needle in firings[0].why


def test_exploding_tensor_healthy_and_threshold(tmp_path) -> None:
    path = str(tmp_path / "ok.zarr")
    values = [RNG.standard_normal((3, 4)).astype("f4") * 1e5 for _ in range(3)]
    write(path, {"train": [(i, {"fc.weight": tensor("weights", w)}) for i, w in enumerate(values)]})
    assert _fired(path, "exploding_tensor") == []
    peaks = [float(np.abs(w).max()) for w in values]
    limit = sorted(peaks)[1]  # fires exactly where max |x| > limit
    assert _fired(path, "exploding_tensor", threshold=limit) == [
        i for i, p in enumerate(peaks) if p > limit
    ]
    assert _fired(path, "exploding_tensor", threshold=None) == []


# ------------------------------------------------------------------ dead_relu
def _relu_dump(path: str, dead_channels: list[int], regex_name: str = "relu.output_0") -> None:
    recs = []
    for i, n_dead in enumerate(dead_channels):
        a = np.maximum(RNG.standard_normal((6, 4, 3, 3)), 0).astype("f4")
        a[:, :n_dead] = 0
        if n_dead == 0:
            a[0, 3, 0, 0] = 0.5  # a channel active at 1 of 54 values (1.9% >= 1%) is alive
            a[:, 3] = 0
            a[0, 3, 0, 0] = 0.5
        recs.append((i, {regex_name: tensor("activations", a, "relu")}))
    write(path, {"train": recs}, modules=RELU_MODULES)


def test_dead_relu(tmp_path) -> None:
    path = str(tmp_path / "sick.zarr")
    # 2 of 4 dead is 50%: not above layer_threshold 0.5; 3 of 4 is
    _relu_dump(path, [0, 1, 2, 3, 2, 4])
    firings = check(path, ["dead_relu"])
    assert [f.step for f in firings] == [3, 5]
    assert "relu.output_0: 75% of 4 channels dead" in firings[0].why
    assert _fired(path, "dead_relu", layer_threshold=0.25) == [2, 3, 4, 5]
    healthy = str(tmp_path / "ok.zarr")
    _relu_dump(healthy, [0, 1, 2, 0])
    assert _fired(healthy, "dead_relu") == []
    # 1 non-zero of 54 values is 1.85% activity: dead under a 2% inactivity threshold
    assert _fired(healthy, "dead_relu", inactive_threshold=0.02, layer_threshold=0.2) == [
        0,
        1,
        2,
        3,
    ]


def test_dead_relu_reads_only_relu_outputs(tmp_path) -> None:
    path = str(tmp_path / "conv.zarr")
    zeros = np.zeros((2, 4, 3, 3), "f4")
    write(
        path,
        {"train": [(0, {"conv.output_0": tensor("activations", zeros, "conv")})]},
        modules=RELU_MODULES,
    )
    assert _fired(path, "dead_relu") == []  # a conv output of zeros is not a ReLU
    assert _fired(path, "dead_relu", tensor_regex=r"^conv\.output") == [0]


# ------------------------------------------------------------------ loss_not_decreasing
def _expected_loss_firings(
    steps: list[int], losses: list[float], w: int, min_decrease: float
) -> list[int]:
    out = []
    for i in range(2 * w - 1, len(losses)):
        prev = np.mean(losses[i - 2 * w + 1 : i - w + 1])
        cur = np.mean(losses[i - w + 1 : i + 1])
        if prev - cur <= min_decrease * abs(prev):
            out.append(steps[i])
    return out


def test_loss_not_decreasing(tmp_path) -> None:
    losses = [2.0, 1.8, 1.5, 1.3, 1.2, 1.15, 1.16, 1.2, 1.18, 1.25]
    steps = [5 * i for i in range(len(losses))]
    path = str(tmp_path / "sick.zarr")
    write(
        path,
        {
            "train": [
                (s, {"loss.output_0": tensor("losses", np.float32(v), "loss")})
                for s, v in zip(steps, losses, strict=True)
            ]
        },
    )
    got = _fired(path, "loss_not_decreasing", window=2)
    f32 = [float(np.float32(v)) for v in losses]
    assert got == _expected_loss_firings(steps, f32, 2, 0.0) and got[0] == 35
    got = _fired(path, "loss_not_decreasing", window=2, min_decrease=0.1)
    assert got == _expected_loss_firings(steps, f32, 2, 0.1) and got[0] == 30
    healthy = str(tmp_path / "ok.zarr")
    falling = [3.0 * 0.9**i for i in range(12)]
    write(
        healthy,
        {
            "train": [
                (i, {"loss.output_0": tensor("losses", np.float32(v), "loss")})
                for i, v in enumerate(falling)
            ]
        },
    )
    assert _fired(healthy, "loss_not_decreasing") == []


# ------------------------------------------------------------------ weight_update_ratio
def test_weight_update_ratio(tmp_path) -> None:
    w = [RNG.standard_normal((4, 4))]
    for i in range(1, 6):
        if i == 3:
            w.append(w[-1].copy())  # frozen between the saved steps 20 and 30
        elif i == 5:
            w.append(w[-1] * 50.0)  # blown up between 40 and 50
        else:
            w.append(w[-1] - 0.01 * RNG.standard_normal((4, 4)))
    path = str(tmp_path / "sick.zarr")
    write(
        path,
        {
            "train": [
                (10 * i, {"fc.weight": tensor("weights", x.astype("f4"))}) for i, x in enumerate(w)
            ]
        },
    )
    firings = check(path, ["weight_update_ratio"])
    assert [f.step for f in firings] == [30, 50]
    w32 = [x.astype("f4").astype("f8") for x in w]
    ratio = np.linalg.norm(w32[5] - w32[4]) / (np.linalg.norm(w32[4]) + 1e-9)
    assert f"||dw||/||w|| {ratio:.3g} since step 40" in firings[1].why
    ratios = [np.linalg.norm(w32[i] - w32[i - 1]) / np.linalg.norm(w32[i - 1]) for i in (1, 2, 4)]
    assert _fired(path, "weight_update_ratio", large=min(ratios) * 0.99) == [10, 20, 30, 40, 50]
    healthy = str(tmp_path / "ok.zarr")
    write(
        healthy,
        {
            "train": [
                (10 * i, {"fc.weight": tensor("weights", x.astype("f4"))})
                for i, x in enumerate(w[:3])
            ]
        },
    )
    assert _fired(healthy, "weight_update_ratio") == []


# ------------------------------------------------------------------ accuracy_drop
def _eval_dump(path: str, hits: list[int], n: int = 10, classes: int = 3) -> list[float]:
    """Eval records whose argmax matches the labels on ``hits[i]`` of ``n`` examples."""
    recs, accs = [], []
    for i, h in enumerate(hits):
        labels = RNG.integers(0, classes, n)
        logits = RNG.standard_normal((n, classes)).astype("f4")
        pred = labels.copy()
        pred[h:] = (labels[h:] + 1) % classes
        logits[np.arange(n), pred] += 10.0
        accs.append(float(np.mean(np.argmax(logits, 1) == labels)))
        recs.append(
            (
                i,
                {
                    "loss.input_0.0": tensor("loss_inputs", logits, "loss"),
                    "loss.input_0.1": tensor("loss_inputs", labels, "loss"),
                },
            )
        )
    train = [(0, {"fc.weight": tensor("weights", np.ones((2, 2), "f4"))})]
    write(path, {"train": train, "eval": recs})
    return accs


def test_accuracy_drop_from_loss_inputs(tmp_path) -> None:
    path = str(tmp_path / "sick.zarr")
    accs = _eval_dump(path, [9, 9, 8, 6, 9])
    assert accs == [0.9, 0.9, 0.8, 0.6, 0.9]
    firings = check(path, ["accuracy_drop"])  # baseline: the first step's 0.9, threshold 0.05
    assert [(f.step, f.mode) for f in firings] == [(2, "eval"), (3, "eval")]
    assert "accuracy 0.8000 is 0.1000 below baseline 0.9000" in firings[0].why
    assert _fired(path, "accuracy_drop", threshold=0.2) == [3]
    assert _fired(path, "accuracy_drop", baseline=0.96) == [0, 1, 2, 3, 4]
    # pooled over 2 saved steps: (8 + 6) / 20 = 0.7 at step 3, (6 + 9) / 20 = 0.75 at step 4
    assert _fired(path, "accuracy_drop", window=2, threshold=0.12) == [3, 4]
    healthy = str(tmp_path / "ok.zarr")
    _eval_dump(healthy, [9, 9, 10, 9])
    assert _fired(healthy, "accuracy_drop") == []


def test_accuracy_drop_from_a_saved_scalar(tmp_path) -> None:
    path = str(tmp_path / "scalar.zarr")
    accs = [0.90, 0.91, 0.88, 0.84, 0.95]
    write(
        path,
        {
            "train": [
                (100 * i, {"scalars.accuracy": tensor("scalars", np.float64(a), "")})
                for i, a in enumerate(accs)
            ]
        },
    )
    firings = check(path, ["accuracy_drop"], params={"baseline": 0.91})
    assert [(f.step, f.mode) for f in firings] == [(300, "train")]
    assert "scalars.accuracy" in firings[0].why
    assert re.search(r"accuracy 0\.8400 is 0\.0700 below", firings[0].why)
