"""Activation checkpointing (``torch.utils.checkpoint``) in the recorded model: the dump
holds the same outputs and gradients as the model run without it, and the model ranks
and prunes (docs/capture.md, "Limitations")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tdump.analyze import Trial, rank
from tdump.capture import Hook


class _Block(nn.Module):
    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.own = nn.ReLU()
        self.act = act  # shared with the net and the other block: called in each segment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.own(self.conv(x)))


class _Net(nn.Module):
    """Stem, then two blocks that may each be a checkpointed segment; one ReLU module
    is called three times (stem, block 1, block 2), so backward reruns two of its calls,
    the later one first."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant  # None: no checkpointing
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.b1 = _Block(6, self.act)
        self.b2 = _Block(6, self.act)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        for block in (self.b1, self.b2):
            if self.reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.fc(x.mean((2, 3)))


_OUTPUTS = ("act.output_0", "act.output_1", "act.output_2", "b1.own.output_0", "b2.own.output_0")


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 2, 5, 5, generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(2)
    ]


def _reference() -> dict[str, np.ndarray]:
    """Outputs and output gradients of step 0, by autograd on the un-checkpointed net
    (retain_grad on each call's output), without a hook."""
    torch.manual_seed(0)
    model = _Net(None)
    seen: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def keep(path: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def fwd(module: nn.Module, args: object, out: torch.Tensor) -> None:
            k = counts.get(path, 0)
            counts[path] = k + 1
            out.retain_grad()
            seen[f"{path}.output_{k}"] = out

        return fwd

    for path, module in (("act", model.act), ("b1.own", model.b1.own), ("b2.own", model.b2.own)):
        module.register_forward_hook(keep(path))
    x, y = _batches()[0]
    nn.functional.cross_entropy(model(x), y).backward()
    ref = {}
    for name, t in seen.items():
        assert t.grad is not None
        ref[name] = t.detach().numpy()
        ref[name + ".grad"] = t.grad.numpy()
    ref["stem.weight.grad"] = model.stem.weight.grad.numpy()  # type: ignore[union-attr]
    return ref


def _record(out: Path, reentrant: bool, reduction: str | None = None) -> None:
    torch.manual_seed(0)
    model = _Net(reentrant)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    hook = Hook(
        out,
        include_regex=r"(act|own)\.output|stem\.weight",
        save_interval=1,
        reduction=reduction,
        strict=True,
    )
    hook.register_module(model)
    with hook:
        for x, y in _batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_outputs_and_gradients_equal_the_plain_nets(
    tmp_path: Path, reentrant: bool
) -> None:
    ref = _reference()
    _record(tmp_path / "d.zarr", reentrant)
    trial = Trial(tmp_path / "d.zarr")
    names = {*_OUTPUTS, *(n + ".grad" for n in _OUTPUTS)}
    assert names <= set(trial.tensor_names())
    for name in [*sorted(names), "stem.weight.grad"]:
        np.testing.assert_allclose(
            trial.tensor(name).value(0), ref[name], rtol=1e-5, atol=1e-7, err_msg=name
        )
    # the backward of step 0 left nothing in step 1's record, and step 1 has its own
    assert set(trial.tensor("act.output_2.grad").steps()) == {0, 1}


def test_checkpointed_taylor_terms_equal_the_plain_nets(tmp_path: Path) -> None:
    ref = _reference()
    _record(tmp_path / "t.zarr", True, reduction="taylor")
    trial = Trial(tmp_path / "t.zarr")
    for name in _OUTPUTS:
        expected = (ref[name].astype(np.float64) * ref[name + ".grad"]).mean(axis=(2, 3))
        got = trial.tensor(name + ".taylor").value(0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9, err_msg=name)


def test_ranking_a_reentrant_checkpointed_run_scores_every_block(tmp_path: Path) -> None:
    _record(tmp_path / "r.zarr", True)
    ranks = rank(tmp_path / "r.zarr")
    assert {"b1.conv", "b2.conv"} <= set(ranks["layer"])


def test_pruning_a_checkpointed_net_traces_quietly_and_trains(tmp_path: Path) -> None:
    import warnings

    from tdump import prune

    _record(tmp_path / "p.zarr", True)
    torch.manual_seed(0)
    model = _Net(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tracing the checkpointed forward warns nothing
        pruned, _plan = prune(model, rank(tmp_path / "p.zarr"), ratio=0.3)
    assert pruned.stem.out_channels < 6 and pruned.b1.conv.out_channels < 6
    x, y = _batches()[0]
    model.eval()
    pruned.eval()
    assert pruned(x).shape == model(x).shape
    pruned.train()
    nn.functional.cross_entropy(pruned(x), y).backward()  # through the checkpointed blocks
    assert pruned.b2.conv.weight.grad is not None
