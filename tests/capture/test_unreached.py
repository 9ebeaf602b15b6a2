"""``include_activations`` also takes the pre-activation of each layer no activation
module carries (a U-Net's up-conv), from the traced step on."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tdump.analyze import Trial, rank
from tdump.capture import Hook


class TinyUNet(nn.Module):
    """conv -> relu, pooled, up-conv (-> BatchNorm), concatenated with the skip, conv ->
    relu, head. ``inplace_skip`` adds the skip to the up-conv's output in place first."""

    def __init__(self, *, norm: bool = True, inplace_skip: bool = False) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.dec = nn.Conv2d(8, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Conv2d(4, 2, 1)
        self.inplace_skip = inplace_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.act1(self.enc(x))
        u = self.up_bn(self.up(F.max_pool2d(e, 2)))
        if self.inplace_skip:
            u += e
        return self.head(self.act2(self.dec(torch.cat([u, e], 1))))


def _keeper(seen: dict[str, tuple[np.ndarray, torch.Tensor]], name: str) -> Callable[..., None]:
    """A forward hook keeping the output's value as the call returned it, and the tensor
    (for its gradient after backward)."""

    def hook(_m: nn.Module, _a: object, out: torch.Tensor) -> None:
        out.retain_grad()
        seen[name] = (out.detach().numpy().copy(), out)

    return hook


def _train(model: nn.Module, out: Path, steps: int = 2, **options: object) -> list[dict]:
    """``steps`` forward and backward passes under a hook saving every step; per step, the
    outputs and output gradients a copy of the model computes (the independent reference)."""
    torch.manual_seed(1)
    xs = [torch.randn(3, 2, 8, 8) for _ in range(steps)]
    ys = [torch.randint(0, 2, (3, 8, 8)) for _ in range(steps)]
    expected = []
    for x, y in zip(xs, ys, strict=True):
        ref = copy.deepcopy(model)
        seen: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        for name in ("up", "up_bn", "act1"):
            getattr(ref, name).register_forward_hook(_keeper(seen, name))
        F.cross_entropy(ref(x), y).backward()
        expected.append({k: (value, t.grad.numpy()) for k, (value, t) in seen.items()})
    hook = Hook(str(out), include_activations=True, save_interval=1, strict=True, **options)
    hook.register_module(model)
    for x, y in zip(xs, ys, strict=True):  # no optimizer: every step sees the reference's weights
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    hook.close()
    return expected


def test_up_conv_output_is_recorded_from_the_traced_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyUNet().train()
    expected = _train(model, tmp_path / "d.zarr")
    trial = Trial(tmp_path / "d.zarr")
    outputs = {n for n in trial.tensor_names() if ".output_" in n}
    # the up-conv's furthest pre-activation (its BatchNorm's) joins the ReLUs; the head's
    # channels are the model's outputs and the up-conv's own output is not needed
    assert outputs == {f"{m}.output_0{g}" for m in ("act1", "act2", "up_bn") for g in ("", ".grad")}
    for step, want in enumerate(expected):
        for module in ("up_bn", "act1"):
            value, grad = want[module]
            np.testing.assert_allclose(
                trial.tensor(f"{module}.output_0").value(step), value, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                trial.tensor(f"{module}.output_0.grad").value(step), grad, rtol=1e-5, atol=1e-8
            )


def test_taylor_term_of_the_up_conv_equals_numpy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyUNet(norm=False).train()
    expected = _train(model, tmp_path / "d.zarr", reduction="taylor")
    trial = Trial(tmp_path / "d.zarr")
    assert "up_bn.output_0.taylor" in trial.tensor_names()  # the Identity after the up-conv
    for step, want in enumerate(expected):
        value, grad = want["up"]
        np.testing.assert_allclose(
            trial.tensor("up_bn.output_0.taylor").value(step),
            (value.astype(np.float64) * grad).mean(axis=(2, 3)),
            rtol=1e-5,
            atol=1e-9,
        )
    table = rank(str(tmp_path / "d.zarr"), criterion="taylor")
    assert set(table["layer"]) == {"enc", "up", "dec"}


def test_output_changed_in_place_is_recorded_from_the_next_step(tmp_path: Path) -> None:
    """``u += skip`` after the up-conv's BatchNorm: the traced step sees the sum, not the
    call's output, so that step keeps nothing of it; the next saves it at the call."""
    torch.manual_seed(0)
    model = TinyUNet(inplace_skip=True).train()
    expected = _train(model, tmp_path / "d.zarr", steps=3)
    tensor = Trial(tmp_path / "d.zarr").tensor("up_bn.output_0")
    assert tensor.steps() == [1, 2]
    np.testing.assert_allclose(tensor.value(1), expected[1]["up_bn"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"include_activations": False, "include_regex": "act"}, {"exclude_regex": "up_bn"}],
)
def test_only_the_activations_selection_widens(tmp_path: Path, options: dict) -> None:
    """A selection by regex alone records what it says; ``exclude_regex`` still wins."""
    torch.manual_seed(0)
    model = TinyUNet()
    hook = Hook(str(tmp_path / "d.zarr"), **{"include_activations": True, **options})
    hook.register_module(model)
    F.cross_entropy(
        model(torch.randn(2, 2, 8, 8)), torch.zeros(2, 8, 8, dtype=torch.long)
    ).backward()
    hook.close()
    names = Trial(tmp_path / "d.zarr").tensor_names()
    assert not any(n.startswith("up") and ".output_" in n for n in names)
    assert "act1.output_0" in names


def test_resnet_takes_nothing_more(tmp_path: Path) -> None:
    """Every conv of a ResNet is carried by a ReLU or summed with one that is; an eval
    pass, which records no sums, adds nothing either (its downsample convs would look
    unreached)."""
    model = torchvision.models.resnet18(num_classes=3)
    hook = Hook(str(tmp_path / "d.zarr"), include_activations=True, save_interval=1)
    hook.register_module(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()(x)
    for _ in range(2):
        F.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
        with torch.no_grad():
            model.eval()(x)
    hook.close()
    assert {"train", "eval"} <= set(Trial(tmp_path / "d.zarr").modes())
    modules = {
        n.split(".output_")[0] for n in Trial(tmp_path / "d.zarr").tensor_names() if ".output_" in n
    }
    assert all(isinstance(model.get_submodule(m), nn.ReLU) for m in modules)
