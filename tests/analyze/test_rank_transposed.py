"""Transposed convs rank like convs: their output channels are the weight's axis 1.

A small decoder (``conv -> bn -> relu -> ConvTranspose2d -> bn -> relu -> conv``) is
trained under the real hook; every criterion must score the transposed conv's
*output* channels exactly as numpy does from the stored tensors (weights
``(in, out, kh, kw)``), and its ranks must prune it through the surgery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tdump
from tdump._format import StoreReader


class Decoder(nn.Module):
    """``depthwise``: the upsampling is a learned per-channel one (CenterNet's IDA-up),
    ``groups == channels``."""

    def __init__(self, depthwise: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        if depthwise:
            self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=8)
        else:
            self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(self.up.out_channels)
        self.up_relu = nn.ReLU()
        self.head = nn.Conv2d(self.up.out_channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        return self.head(self.up_relu(self.up_bn(self.up(y))))


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Decoder]:
    from tdump.capture import Hook

    path = tmp_path_factory.mktemp("decoder") / "dump.zarr"
    torch.manual_seed(0)
    model = Decoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with Hook(
        str(path),
        include_regex=r".*relu|.*weight",
        include_activations=True,
        save_interval=2,
        strict=True,
    ) as hook:
        hook.register_module(model)
        for _ in range(5):
            x = torch.randn(4, 3, 5, 5, generator=g)
            target = torch.randn(4, 2, 10, 10, generator=g)
            opt.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
    return path, model


def _scores(ranks: object, layer: str) -> np.ndarray:
    df = ranks[ranks.layer == layer].sort_values("channel")  # type: ignore[index]
    return df["score"].to_numpy()


def _read(path: Path, name: str) -> list[np.ndarray]:
    reader = StoreReader(str(path))
    return [
        reader.read("train", name, i).astype(np.float64)
        for i in range(len(reader.records("train")["step"]))
    ]


def test_weight_criteria_read_the_output_axis(dump: tuple[Path, Decoder]) -> None:
    path, _ = dump
    w, grads = _read(path, "up.weight"), _read(path, "up.weight.grad")
    assert w[-1].shape == (8, 6, 2, 2)
    l1 = tdump.rank(path, criterion="l1", normalize=False)
    np.testing.assert_allclose(_scores(l1, "up"), np.abs(w[-1]).sum(axis=(0, 2, 3)), rtol=1e-12)
    tw = tdump.rank(path, criterion="taylor-weight", normalize=False)
    per_step = [(a * b).sum(axis=(0, 2, 3)) ** 2 for a, b in zip(w, grads, strict=True)]
    np.testing.assert_allclose(_scores(tw, "up"), np.mean(per_step, axis=0), rtol=1e-10)


def test_taylor_ranks_the_transposed_conv_from_its_relu(dump: tuple[Path, Decoder]) -> None:
    path, _ = dump
    ranks = tdump.rank(path, normalize=False)
    assert sorted(set(ranks.layer)) == ["conv", "up"]  # the head has no activation after it
    a, g = _read(path, "up_relu.output_0"), _read(path, "up_relu.output_0.grad")
    terms = np.concatenate([(x * y).mean(axis=(2, 3)) for x, y in zip(a, g, strict=True)])
    np.testing.assert_allclose(_scores(ranks, "up"), np.abs(terms).mean(axis=0), rtol=1e-6)


def test_transposed_ranks_prune_it(dump: tuple[Path, Decoder]) -> None:
    path, model = dump
    ranks = tdump.rank(path, criterion="l1")
    pruned, plan = tdump.prune(model, ranks[ranks.layer == "up"], count=2)
    weakest = set(ranks[ranks.layer == "up"].sort_values("score").channel.head(2))
    kept = [c for c in range(6) if c not in weakest]
    assert list(plan.layers["up"].keep) == kept
    assert pruned.up.out_channels == 4 and pruned.up_bn.num_features == 4
    assert pruned.head.in_channels == 4
    np.testing.assert_array_equal(pruned.up.weight.detach(), model.up.weight.detach()[:, kept])
    model.eval()
    pruned.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        mask = torch.zeros(1, 6, 1, 1)
        mask[0, kept] = 1
        y = model.relu(model.bn(model.conv(x)))
        expected = model.head(model.up_relu(model.up_bn(model.up(y))) * mask)
        torch.testing.assert_close(pruned(x), expected)


def test_a_depthwise_transposed_conv_ranks_on_axis_0_and_prunes_with_its_input(
    tmp_path: Path,
) -> None:
    from tdump.capture import Hook

    path = tmp_path / "dw.zarr"
    torch.manual_seed(0)
    model = Decoder(depthwise=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with Hook(str(path), include_regex=r".*relu|.*weight", include_activations=True) as hook:
        hook.register_module(model)
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5, generator=g)
            loss = (model(x) - torch.randn(4, 2, 10, 10, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = _read(path, "up.weight")[-1]
    assert w.shape == (8, 1, 4, 4)  # (in, out / groups, ...): channel c is row c
    l1 = tdump.rank(path, criterion="l1", normalize=False)
    np.testing.assert_allclose(_scores(l1, "up"), np.abs(w).sum(axis=(1, 2, 3)), rtol=1e-12)
    ranks = tdump.rank(path, normalize=False)
    assert sorted(set(ranks.layer)) == ["conv", "up"]
    a, gr = _read(path, "up_relu.output_0"), _read(path, "up_relu.output_0.grad")
    terms = np.concatenate([(x * y).mean(axis=(2, 3)) for x, y in zip(a, gr, strict=True)])
    np.testing.assert_allclose(_scores(ranks, "up"), np.abs(terms).mean(axis=0), rtol=1e-6)
    pruned, plan = tdump.prune(model, ranks, count=3)
    kept = list(plan.layers["conv"].keep)
    assert len(kept) == 5 and list(plan.layers["up"].keep) == kept  # one group
    assert (pruned.up.in_channels, pruned.up.out_channels, pruned.up.groups) == (5, 5, 5)
    model.eval()
    pruned.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        mask = torch.zeros(1, 8, 1, 1)
        mask[0, kept] = 1  # depthwise: channel c of the upsampling reads only channel c
        y = model.relu(model.bn(model.conv(x)))
        expected = model.head(model.up_relu(model.up_bn(model.up(y))) * mask)
        torch.testing.assert_close(pruned(x), expected)
