"""A conv before a PixelShuffle ranks from the activation after it, one score per run.

Channel ``c`` after ``PixelShuffle(r)`` is the run of ``r * r`` channels ``c * r * r``
to ``(c + 1) * r * r - 1`` before it, so the Taylor score of that channel is the score
of the run as one unit: each of the conv's channels in it gets that score. Checked
against numpy on the conv's own recorded output and gradient (ReLU's output times its
gradient equals the conv output's times its gradient), and in two rounds with surgery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import tdump.surgery as surgery
from tdump._format import StoreReader
from tdump.analyze import rank


class Upsampler(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.up = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.ReLU()
        self.tail = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.act(self.shuffle(self.up(self.relu(self.head(x))))))


def _record(path: Path, model: nn.Module) -> None:
    from tdump.capture import Hook

    lossf = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with Hook(
        str(path),
        include_regex=r"^up\.output_0",  # the conv's own output too: the independent check
        include_activations=True,
        save_interval=2,
        strict=True,
    ) as hook:
        hook.register_module(model)
        hook.register_loss(lossf)
        for _ in range(5):
            x = torch.randn(4, 1, 5, 5, generator=g)
            opt.zero_grad()
            lossf(model(x), torch.randn(4, 1, 10, 10, generator=g)).backward()
            opt.step()


def test_runs_before_a_pixel_shuffle_share_the_score_of_their_channel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Upsampler()
    dump = tmp_path / "d.zarr"
    _record(dump, model)
    table = rank(str(dump), normalize=False, progress=False)
    up = table[table.layer == "up"].sort_values("channel")
    assert up.sources.iloc[0] == "act.output_0,act.output_0.grad"  # after the shuffle
    got = up.score.to_numpy()
    # numpy on the conv's own output: a run's a * g, averaged over space and the run
    r = StoreReader(str(dump))
    per_example = []
    for i in range(len(r.steps("train"))):
        a = r.array("train", "up.output_0")[i].astype(np.float64)
        gr = r.array("train", "up.output_0.grad")[i].astype(np.float64)
        ag = (a * gr).reshape(a.shape[0], -1, 4, *a.shape[2:]).mean(axis=(2, 3, 4))
        per_example.append(np.abs(ag))
    want = np.repeat(np.concatenate(per_example).mean(axis=0), 4)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-12)
    # the surgery takes whole runs, and a second round ranks and prunes again
    pruned, plan = surgery.prune(model, table, ratio=0.4)
    keep = np.asarray(plan.layers["up"].keep).reshape(-1, 4)
    assert (keep == keep[:, :1] + np.arange(4)).all() and len(keep) < 6
    _record(tmp_path / "d2.zarr", pruned)
    again = rank(str(tmp_path / "d2.zarr"), progress=False)
    assert int((again.layer == "up").sum()) == pruned.up.out_channels
