"""Wrong arguments to explicit Hook calls: a one-line ConfigError at the call, capture goes on.

Capture never crashes training for a failure inside a hook; a wrong argument to an
explicit call (``save_scalar``, ``register_*``, ``record_loss``, ``Hook(out)``) is the
caller's error, refused where it is made whatever ``strict`` says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdump.analyze import Trial
from tdump.capture import Hook
from tdump.errors import ConfigError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("strict", [False, True])
def test_save_scalar_refuses_what_is_not_a_number_and_capture_goes_on(
    tmp_path: Path, strict: bool
) -> None:
    model = _net()
    out = str(tmp_path / "d.zarr")
    saved: dict[int, float] = {}
    with Hook(out, include_regex=r"0\.weight", save_interval=2, strict=strict) as hook:
        hook.register_module(model)
        for step in range(5):
            model(torch.randn(2, 3)).sum().backward()
            for bad, needle in [
                ("abc", "not str 'abc'"),
                ([1.0], "not list [1.0]"),
                (torch.ones(3), "not a tensor of shape (3,)"),
                (torch.ones(1, dtype=torch.complex64), "not a tensor complex"),
            ]:
                with pytest.raises(ConfigError, match="takes a real number or a one-element") as e:
                    hook.save_scalar("tag", bad)  # saved step or not: refused at the call
                assert needle in _one_line(e) and "save_scalar('tag', ...)" in str(e.value)
            with pytest.raises(ConfigError, match="save_scalar needs a name"):
                hook.save_scalar("", 1.0)
            hook.save_scalar("acc", np.float32(step / 4))
            hook.save_scalar("loss", torch.tensor([[step * 2.0]]))
            hook.save_scalar("n", np.array([step]))
            saved[step] = step / 4
    trial = Trial(out)
    assert trial.steps(mode="train") == [0, 2, 4]
    assert trial.tensor("0.weight").steps(mode="train") == [0, 2, 4]
    assert trial.scalar("acc") == {s: saved[s] for s in (0, 2, 4)}
    assert trial.scalar("loss") == {0: 0.0, 2: 4.0, 4: 8.0}
    assert trial.scalar("n") == {0: 0.0, 2: 2.0, 4: 4.0}
    assert "scalars.tag" not in trial.tensor_names(mode="train")


def test_register_calls_refuse_wrong_types_in_one_line(tmp_path: Path) -> None:
    model = _net()
    out = str(tmp_path / "d.zarr")
    hook = Hook(out, include_regex=r"0\.weight", save_interval=1)
    cases = [
        (
            lambda: hook.register_loss(F.cross_entropy),  # type: ignore[arg-type]
            "register_loss takes a loss module, not the function cross_entropy; use its "
            "module, nn.CrossEntropyLoss(), or keep the function and call "
            "hook.record_loss(loss, logits, targets) after it",
        ),
        (
            lambda: hook.register_loss(nn.MSELoss),  # type: ignore[arg-type]
            "register_loss takes a module instance, not the class MSELoss; create it first",
        ),
        (
            lambda: hook.register_module("model"),  # type: ignore[arg-type]
            "register_module takes an nn.Module, not str 'model'; pass the model",
        ),
        (
            lambda: hook.register_optimizer("sgd"),  # type: ignore[arg-type]
            "register_optimizer takes a torch.optim optimizer, not str 'sgd'",
        ),
        (
            lambda: hook.record_loss(0.5),  # type: ignore[arg-type]
            "record_loss takes the loss tensor, not float 0.5",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as e:
            call()
        assert message in _one_line(e)
    # nothing was half-registered: the right arguments work on the same hook
    hook.register_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.register_optimizer(opt)
    losses = []
    for _ in range(2):
        x, y = torch.randn(2, 3), torch.tensor([0, 1])
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        hook.record_loss(loss, logits, y)  # the way to record a functional loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    hook.close()
    trial = Trial(out)
    assert trial.steps(mode="train") == [0, 1]
    got = trial.tensor("loss.output_0").values(mode="train")
    np.testing.assert_allclose([float(got[s]) for s in (0, 1)], losses, rtol=1e-6)


def test_hook_refuses_an_out_that_is_not_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in (None, 3):
        with pytest.raises(ConfigError, match=r"out must be a store path or URL .*not ") as e:
            Hook(bad)  # type: ignore[arg-type]
        _one_line(e)
    assert not (tmp_path / "None").exists() and not (tmp_path / "3").exists()
    model = _net()
    with Hook(tmp_path / "p.zarr", include_regex="weight", save_interval=1) as hook:  # PathLike
        assert hook.out == str(tmp_path / "p.zarr")
        hook.register_module(model)
        model(torch.randn(1, 3))
    assert Trial(str(tmp_path / "p.zarr")).steps(mode="train") == [0]
