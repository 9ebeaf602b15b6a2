"""Super-resolution upsamplers: a conv before ``pixel_shuffle`` prunes in whole blocks.

``pixel_shuffle(r)`` turns each run of ``r * r`` channels into one channel; the conv
reading it drops input channel ``c`` exactly when run ``c`` goes. Equivalence is
checked in float64 against the unpruned model with the removed channels computed away
(``zoo.assert_equivalent``), for the module and the function, then save, load (a tdump
checkpoint and a plain state_dict) and a second round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tdump.surgery as surgery
from tests.surgery import zoo


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(self.act(self.c1(x)))


class EDSR(nn.Module):
    """EDSR-like x6: head, residual body, a x2 (PixelShuffle) and a x3 (F.pixel_shuffle)
    upsampler, tail."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(ResBlock(c), nn.Conv2d(c, c, 3, padding=1))
        self.up1 = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.up2 = nn.Conv2d(c, 9 * c, 1)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.body(h)
        h = F.relu(self.shuffle(self.up1(h)))
        return self.tail(F.pixel_shuffle(self.up2(h), 3))


X = torch.randn(2, 3, 4, 4, dtype=torch.float64)


def _scores(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    graph = surgery.build_graph(model)
    return {m: rng.random(g.size) for g in graph.groups if not g.frozen for m in g.members}


def _blocks(keep: list[int], factor: int) -> list[int]:
    """The runs ``keep`` holds whole (fails when it holds part of one)."""
    runs = np.asarray(keep).reshape(-1, factor)
    assert (runs == runs[:, :1] + np.arange(factor)).all() and (runs[:, 0] % factor == 0).all()
    return (runs[:, 0] // factor).tolist()


def test_upsampler_convs_lose_whole_blocks_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = EDSR().double()
    graph = surgery.build_graph(model)
    assert not graph.group_of("up1").frozen and not graph.group_of("up2").frozen
    pruned, plan = surgery.prune(model, _scores(model, 0), ratio=0.3)
    up1 = _blocks(plan.layers["up1"].keep, 4)
    up2 = _blocks(plan.layers["up2"].keep, 9)
    assert 0 < len(up1) < 8 and 0 < len(up2) < 8
    # the conv after each shuffle reads one channel per kept block
    assert pruned.up2.in_channels == len(up1) and pruned.tail.in_channels == len(up2)
    zoo.assert_equivalent(model, pruned, plan, X)
    assert pruned(X).shape == (2, 3, 24, 24)
    for plain in (False, True):
        path = tmp_path / f"p{int(plain)}.pt"
        if plain:
            torch.save(pruned.state_dict(), path)
        else:
            surgery.save(path, pruned, arch=EDSR)
        loaded = surgery.load(path, arch=EDSR).double()
        with torch.no_grad():
            assert torch.equal(loaded(X), pruned(X))
    again, plan2 = surgery.prune(loaded, _scores(loaded, 1), ratio=0.3)
    zoo.assert_equivalent(loaded, again, plan2, X)
    assert again.up2.in_channels * 4 == again.up1.out_channels < pruned.up1.out_channels


def test_a_count_between_blocks_says_why_fewer_went() -> None:
    torch.manual_seed(0)
    model = EDSR().double()
    scores = {"up1": np.arange(32.0)}
    pruned, plan = surgery.prune(model, scores, count=6, scope="per-layer")
    assert pruned.up1.out_channels == 28  # one block of 4, not 6 channels
    assert any("pixel_shuffle go only in whole groups" in n for n in plan.notes)


class _Split(nn.Module):
    """Runs of 4 that straddle two convs (6 + 6 channels), and a BatchNorm after a shuffle."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 8 if norm else 6, 1)
        self.norm = nn.BatchNorm2d(2) if norm else nn.Identity()
        self.out = nn.Conv2d(3 if not norm else 2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.BatchNorm2d):
            return self.out(self.norm(F.pixel_shuffle(self.b(x), 2))) + self.a(x).mean()
        return self.out(F.pixel_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2))


@pytest.mark.parametrize("norm", [False, True], ids=["straddling-runs", "norm-after"])
def test_what_a_shuffle_cannot_split_stays(norm: bool) -> None:
    graph = surgery.build_graph(_Split(norm))
    assert graph.group_of("b").frozen
    reason = graph.group_of("b").reason
    assert ("cannot split" in reason) if not norm else ("norm does not match" in reason)


class Downsampler(nn.Module):
    """Restormer-like downsampling: conv -> ``nn.PixelUnshuffle(2)`` -> conv, then
    ``F.pixel_unshuffle(x, 3)`` -> conv; a BatchNorm over an unshuffled map keeps its
    channels (``norm``)."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.down = nn.PixelUnshuffle(2)
        self.norm = nn.BatchNorm2d(24) if norm else nn.Identity()
        self.c3 = nn.Conv2d(24, 10, 3, padding=1)
        self.c4 = nn.Conv2d(90, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(F.relu(self.c1(x)))
        x = F.relu(self.c3(F.gelu(self.norm(self.down(x)))))
        return self.head(self.c4(F.pixel_unshuffle(x, 3)).mean((2, 3)))


def test_convs_before_pixel_unshuffle_prune_exactly(tmp_path) -> None:
    """``pixel_unshuffle(r)`` turns channel ``c`` into channels ``c*r*r .. c*r*r + r*r - 1``:
    the conv reading it loses that block of inputs when ``c`` goes (module and function),
    then save, load and a second round."""
    torch.manual_seed(0)
    model = Downsampler().double().eval()
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3)
    assert plan.notes == ["left alone head: reaches the model output"]
    keep2, keep3 = plan.layers["c2"].keep, plan.layers["c3"].keep
    assert 0 < len(keep2) < 6 and 0 < len(keep3) < 10
    want = torch.cat([model.c3.weight[:, c * 4 : c * 4 + 4] for c in keep2], 1)
    assert torch.equal(pruned.c3.weight, want[keep3])
    assert pruned.c4.in_channels == 9 * len(keep3)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x)
    path = tmp_path / "down.pt"
    surgery.save(path, pruned, arch=Downsampler)
    loaded = surgery.load(path, arch=Downsampler).double().eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    again, plan2 = surgery.prune(loaded, zoo.l1_scores(loaded), ratio=0.3)
    assert again.c3.in_channels < loaded.c3.in_channels
    zoo.assert_equivalent(loaded, again, plan2, x)


def test_a_norm_over_an_unshuffled_map_keeps_its_channels() -> None:
    graph = surgery.build_graph(Downsampler(norm=True))
    assert graph.group_of("c2").frozen and "norm does not match" in graph.group_of("c2").reason
    assert not graph.group_of("c3").frozen and not graph.group_of("c1").frozen
