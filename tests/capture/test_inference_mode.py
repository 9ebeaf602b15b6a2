"""Validation under ``torch.inference_mode()`` / ``torch.no_grad()`` between train steps.

Host buffers (and reductions) made while inference mode is on are inference tensors;
a later record reusing one outside inference mode used to fail its in-place copy and
switch capture off for the rest of training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tdump.analyze import Trial
from tdump.capture import Hook
from tdump.capture._writer import HostBuffers

_EVAL_MODES: dict[str, Callable[[], object]] = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


@pytest.mark.parametrize("guard", sorted(_EVAL_MODES))
@pytest.mark.parametrize("reduction", [None, "abs_mean", "taylor"])
def test_eval_passes_under_inference_mode_leave_capture_on(
    tmp_path: Path, guard: str, reduction: str | None
) -> None:
    model = _net()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    want: dict[str, dict[int, dict[str, np.ndarray]]] = {"train": {}, "eval": {}}
    out = str(tmp_path / "d.zarr")
    with Hook(
        out, include_regex=r"^1\.|0\.weight", save_interval=1, strict=True, reduction=reduction
    ) as hook:
        hook.register_module(model)
        hook.register_loss(crit)

        def evaluate() -> None:
            model.eval()
            with _EVAL_MODES[guard]():
                for _ in range(2):  # the second pass hands the first one's record over
                    x = torch.randn(2, 1, 6, 6, generator=g)
                    step = len(want["eval"])
                    want["eval"][step] = {
                        "0.weight": model[0].weight.detach().clone().numpy(),
                        "1.output_0": model[1](model[0](x)).clone().numpy(),
                    }
                    model(x)
                    hook.save_scalar("val", model[1](model[0](x)).mean())
            hook.flush()  # its buffers (inference tensors before the fix) are back in the pool

        evaluate()  # a sanity pass before training (Lightning does one)
        for _ in range(3):
            model.train()
            for _ in range(2):
                x, y = torch.randn(2, 1, 6, 6, generator=g), torch.randint(0, 3, (2,), generator=g)
                want["train"][len(want["train"])] = {
                    "0.weight": model[0].weight.detach().clone().numpy(),
                    "1.output_0": model[1](model[0](x)).detach().clone().numpy(),
                }
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
                hook.save_scalar("lr", opt.param_groups[0]["lr"])
            evaluate()
    trial = Trial(out)
    assert trial.steps(mode="train") == list(range(6))
    assert trial.steps(mode="eval") == list(range(8))
    assert trial.tensor("scalars.val").steps(mode="eval") == list(range(8))
    assert trial.tensor("scalars.lr").steps(mode="train") == list(range(6))
    for mode, steps in want.items():
        for step, tensors in steps.items():
            np.testing.assert_array_equal(
                trial.tensor("0.weight").value(step, mode=mode), tensors["0.weight"]
            )
            act = tensors["1.output_0"]
            if reduction is None:
                np.testing.assert_array_equal(
                    trial.tensor("1.output_0").value(step, mode=mode), act
                )
            elif reduction == "abs_mean":
                got = trial.tensor("1.output_0").value(step, mode=mode)
                np.testing.assert_allclose(got, np.abs(act).mean((2, 3)), rtol=1e-6)
    if reduction == "taylor":  # needs a gradient: train steps only
        assert trial.tensor("1.output_0.taylor").steps(mode="train") == list(range(6))
    else:
        assert trial.tensor("1.output_0").steps(mode="eval") == list(range(8))


def test_host_buffers_made_in_inference_mode_are_reused_outside_it() -> None:
    pool = HostBuffers()
    pool.limit = 1 << 20
    with torch.inference_mode():
        a = pool.copy_of(torch.ones(2, 3))
        inf = torch.ones(4)  # an inference tensor (a reduction made in inference mode, say)
    assert not a.is_inference()
    pool.give(a)
    pool.give(inf)
    b = pool.copy_of(torch.zeros(2, 3))
    assert b is a and b.sum().item() == 0.0
    c = pool.copy_of(torch.full((4,), 2.0))  # not the inference tensor: a fresh buffer
    assert c is not inf and not c.is_inference() and c.tolist() == [2.0] * 4
