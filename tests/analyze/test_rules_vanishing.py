"""vanishing_gradient on dumps the real capture Hook wrote.

A healthy Conv(bias)->BatchNorm net must not fire, though its conv biases get a ~0
gradient by construction (BatchNorm removes the per-channel mean, the bias with
it); a deep sigmoid chain, whose first layers' gradients do vanish, must.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdump.analyze import Trial, check
from tdump.analyze.rules import VanishingGradient
from tdump.capture import Hook


def _train(path: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 4) -> None:
    torch.set_num_threads(1)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Hook(path, include_regex=r"weight|bias", save_interval=1, strict=True) as hook:
        hook.register_module(model).register_loss(crit)
        for _ in range(steps):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()


def _mean_abs(trial: Trial, name: str, step: int) -> float:
    return float(np.mean(np.abs(trial.tensor(name).value(step, mode="train").astype("f8"))))


def test_healthy_conv_bn_net_does_not_fire(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # bias=True, followed by BatchNorm
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    path = str(tmp_path / "convbn.zarr")
    _train(path, model, x, y)
    trial = Trial(path)
    # the premise, from the dump: conv biases before BN get ~0, every weight does not
    biases = [_mean_abs(trial, f"{m}.bias.grad", s) for m in ("0", "3") for s in range(4)]
    weights = [
        _mean_abs(trial, f"{m}.weight.grad", s) for m in ("0", "1", "3", "4", "8") for s in range(4)
    ]
    assert max(biases) < 1e-7 < min(weights), (biases, weights)
    assert check(path, ["vanishing_gradient"]) == []
    # left out: the biases BatchNorm follows (from the recorded dataflow), not the head's
    read = VanishingGradient(trial).needed()
    assert "8.bias.grad" in read and "0.bias.grad" not in read and "3.bias.grad" not in read
    assert not any(n.endswith("bias.grad") for n in VanishingGradient(trial, biases=False).needed())
    # with biases=true the rule reads them, and they are below the threshold
    hits = check(path, ["vanishing_gradient"], params={"biases": True})
    assert [f.step for f in hits] == [0, 1, 2, 3] and ".bias.grad" in hits[0].why


def test_deep_sigmoid_chain_fires(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    path = str(tmp_path / "sigmoid.zarr")
    _train(path, model, x, y)
    trial = Trial(path)
    first = [_mean_abs(trial, "0.weight.grad", s) for s in range(4)]
    last = _mean_abs(trial, "24.weight.grad", 0)
    assert max(first) < 1e-7 < last, (first, last)  # the sigmoid chain shrinks it
    hits = check(path, ["vanishing_gradient"])
    assert [f.step for f in hits] == [0, 1, 2, 3]
    # no norm follows these Linear layers: their biases are read too, and vanish as well
    bias = _mean_abs(trial, "0.bias.grad", 0)
    assert bias < 1e-7 and "0.bias.grad" in VanishingGradient(trial).needed()
    low = sorted([(first[0], "0.weight.grad"), (bias, "0.bias.grad")])
    assert f"{low[0][1]}: mean |g| {low[0][0]:.3g}" in hits[0].why
