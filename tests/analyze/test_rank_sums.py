"""Residual blocks written ``act(branch + shortcut)``: the activation after the ``+``
scores the branch's conv (as after an in-place ``+=``), and the shortcut conv is
named as pruned with it, from the ``sum_of`` capture records."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tdump.surgery as surgery
from tdump._format import StoreReader
from tdump.analyze import rank
from tdump.capture import Hook
from tdump.loop._metrics import pruned_with
from tests.analyze.rank_helpers import RECORD_INCLUDE, reference


class UserResNet(nn.Module):
    """Two blocks as tutorials write them: ``relu(bn2(conv2(h)) + bns(short(x)))`` with a
    projection shortcut, then ``relu(x + bn4(conv4(...)))``, the identity first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = (
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.short, self.bns = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3, self.relu3 = (
            nn.Conv2d(8, 5, 3, padding=1),
            nn.BatchNorm2d(5),
            nn.ReLU(),
        )
        self.conv4, self.bn4 = nn.Conv2d(5, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(h)) + self.bns(self.short(x)))
        h = self.relu3(self.bn3(self.conv3(x)))
        x = self.relu4(x + self.bn4(self.conv4(h)))
        return self.fc(x.mean(dim=(2, 3)))


def _record(
    path: Path, model: nn.Module, shape: tuple[int, ...], classes: int, steps: int = 1
) -> str:
    """Train ``model`` ``steps`` SGD steps on random ``shape`` batches of ``classes``
    classes under `tdump record`'s selection, every step saved; the dump's path."""
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with Hook(str(path), include_regex=RECORD_INCLUDE, include_activations=True) as hook:
        hook.register_module(model)
        hook.register_loss(loss_fn)
        for _ in range(steps):
            x = torch.randn(*shape, generator=g)
            y = torch.randint(0, classes, (shape[0],), generator=g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return str(path)


def _record_user_resnet(path: Path) -> str:
    torch.manual_seed(0)
    return _record(path, UserResNet(), (4, 3, 8, 8), 3, steps=3)


def test_the_activation_after_a_sum_scores_the_branch_conv(tmp_path: Path) -> None:
    dump = _record_user_resnet(tmp_path / "d.zarr")
    df = rank(dump, progress=False, normalize=False)
    sources = df.groupby("layer")["sources"].first().to_dict()
    # relu2 after `bn2 + bns` scores conv2; relu4 after `x + bn4` scores conv4, not the
    # conv behind x (conv2, which relu2 scores already)
    assert sources["conv2"] == "relu2.output_0,relu2.output_0.grad"
    assert sources["conv4"] == "relu4.output_0,relu4.output_0.grad"
    assert set(sources) == {"conv1", "conv2", "conv3", "conv4"}
    reader = StoreReader(dump)
    for layer in ("conv2", "conv4"):
        want = reference(reader, "taylor", sources[layer])
        got = df[df["layer"] == layer].sort_values("channel")["score"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)

    meta = df.attrs["tdump"]
    assert set(meta["skipped"]) == {"short"}
    (note,) = [n for n in meta["notes"] if "short" in n]
    assert note.endswith(
        "tdump prune prunes it with the scored layers whose channels it shares "
        "(conv2, conv4), so it needs no score of its own"
    ), note
    # ... which is what the surgery does: its channel graph puts short with them
    graph = surgery.build_graph(UserResNet())
    assert pruned_with(graph, ["conv1", "conv2", "conv3", "conv4"]) == {"short": ["conv2", "conv4"]}


def test_without_sums_the_old_dump_asks_for_the_pre_activations(tmp_path: Path) -> None:
    """A dump written before ``sum_of`` (or by an eval pass): neither conv2 nor conv4
    has an activation of its own, and the note says what to record."""
    import json

    dump = _record_user_resnet(tmp_path / "d.zarr")
    meta_file = Path(dump, "rank0", "zarr.json")
    doc = json.loads(meta_file.read_text())
    for call in doc["attributes"]["tdump"]["calls"]["train"]:
        call.pop("sum_of", None)
    meta_file.write_text(json.dumps(doc))
    df = rank(dump, progress=False)
    assert set(df["layer"]) == {"conv1", "conv3"}
    assert set(df.attrs["tdump"]["skipped"]) == {"conv2", "conv4", "short"}
    assert any("tdump record --include" in n for n in df.attrs["tdump"]["notes"])


def test_on_regnet_rank_s_pruned_with_notes_are_the_surgery_s(tmp_path: Path) -> None:
    """torchvision's RegNet blocks add ``proj(x) + f(x)`` and then apply the activation
    module: rank scores one conv of each sum and names the other as pruned with it,
    and the surgery's channel graph (built from the model, not the dump) agrees."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(num_classes=4)
    df = rank(_record(tmp_path / "r.zarr", model, (2, 3, 32, 32), 4), progress=False)
    skipped = df.attrs["tdump"]["skipped"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    ranked = sorted(set(df["layer"]))
    assert len(ranked) == 67 and len(convs) == 71 and len(skipped) == 4
    truth = pruned_with(surgery.build_graph(model), ranked)
    assert set(truth) == set(skipped) and all("residual +" in why for why in skipped.values())
    (note,) = [n for n in df.attrs["tdump"]["notes"] if "residual +" in n]
    inside = note.split("whose channels they share (")[1].split(")")[0]
    named = [n for n in re.split(", | and ", inside) if not n.endswith(" more")]
    assert len(named) == 3, note
    assert set(named) <= {m for members in truth.values() for m in members}, note


class TutorialBlock(nn.Module):
    """A CIFAR-tutorial block: ``relu(bn2(conv2(...)) + shortcut(x))``, its identity
    shortcut an empty ``nn.Sequential``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.shortcut = nn.Sequential()
        if cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


def test_an_empty_sequential_shortcut_passes_the_channels_on(tmp_path: Path) -> None:
    """The projection shortcut's channels reach the next block's sum through an empty
    ``nn.Sequential``: the note names both conv2 it is pruned with, as the surgery does."""
    torch.manual_seed(0)
    blocks = [TutorialBlock(3, 6), TutorialBlock(6, 6)]
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    df = rank(_record(tmp_path / "t.zarr", model, (2, 3, 6, 6), 3), progress=False)
    (note,) = [n for n in df.attrs["tdump"]["notes"] if "residual +" in n]
    assert note.endswith("(0.conv2, 1.conv2), so it needs no score of its own"), note
    ranked = sorted(set(df["layer"]))
    assert ranked == ["0.conv1", "0.conv2", "1.conv1", "1.conv2"]
    truth = pruned_with(surgery.build_graph(model), ranked)
    assert {k: sorted(v) for k, v in truth.items()} == {"0.shortcut.0": ["0.conv2", "1.conv2"]}
