"""Two pruning rounds of a torchvision ViT, and a rule over a channels-last ReLU.

A ViT's prunable channels are its MLPs' hidden features: ``mlp.0`` is a Linear on
``(batch, tokens, features)``. Recorded the way ``tdump loop`` records (the Taylor
term reduced at source), ranked, pruned, saved, loaded in a fresh model by class,
trained and recorded again: the second round must rank and prune the pruned model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import VisionTransformer

import tdump
from tdump.analyze import check
from tdump.capture import Hook
from tdump.surgery import load, save

VIT = {
    "image_size": 16,
    "patch_size": 8,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 16,
    "mlp_dim": 32,
    "num_classes": 4,
}
MLPS = [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]


def _train(model: nn.Module, out: Path, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lossf = nn.CrossEntropyLoss()
    model.train()
    with Hook(str(out), reduction="taylor", include_activations=True, save_interval=1) as hook:
        hook.register_module(model)
        hook.register_loss(lossf)
        for _ in range(steps):
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad()
            lossf(model(x), y).backward()
            opt.step()


def test_a_vit_prunes_its_mlps_twice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model: nn.Module = VisionTransformer(**VIT)  # type: ignore[arg-type]
    widths = [32]
    for r in range(2):
        _train(model, tmp_path / f"r{r}.zarr")
        ranks = tdump.rank(tmp_path / f"r{r}.zarr")
        # conv_proj's output meets the class token in a torch.cat before any activation:
        # capture records it (docs/capture.md) and rank scores it; prune leaves it alone
        assert sorted(set(ranks.layer)) == ["conv_proj", *MLPS]
        assert all((ranks.layer == m).sum() == widths[-1] for m in MLPS)
        pruned, _ = tdump.prune(model, ranks, ratio=0.25, scope="per-layer")
        widths.append(widths[-1] - widths[-1] // 4)
        ckpt = tmp_path / f"pruned{r}.pt"
        save(
            ckpt,
            pruned,
            arch="torchvision.models.vision_transformer:VisionTransformer",
            arch_kwargs=VIT,
        )
        # the class itself, as a user's script passes it: the file's keyword arguments apply
        model = load(ckpt, arch=VisionTransformer)
        for m in MLPS:
            mlp = model.get_submodule(m.rsplit(".", 1)[0])
            assert mlp[0].out_features == widths[-1] and mlp[3].in_features == widths[-1]
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), pruned.eval()(x))
    assert widths == [32, 24, 18]


class _TokenReLU(nn.Module):
    """A Linear on (batch, tokens, features) whose last 3 of 4 features never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.relu = nn.ReLU()
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.bias[1:] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.fc(x))).mean(1)


def test_dead_relu_counts_the_features_of_a_channels_last_relu(tmp_path: Path) -> None:
    path = tmp_path / "tok.zarr"
    model, lossf = _TokenReLU(), nn.CrossEntropyLoss()
    with Hook(str(path), include_regex=r"relu", save_interval=1) as hook:
        hook.register_module(model)
        hook.register_loss(lossf)
        lossf(model(torch.randn(6, 7, 5)), torch.randint(0, 2, (6,))).backward()
    firings = check(str(path), ["dead_relu"])
    assert [f.step for f in firings] == [0]
    # 3 of the 4 features are dead; along the 7 tokens no channel would be
    assert "relu.output_0: 75% of 4 channels dead" in firings[0].why
    acts = np.asarray(tdump.Trial(str(path)).tensor("relu.output_0").value(0))
    assert acts.shape == (6, 7, 4) and (acts[..., 1:] == 0).all() and (acts[..., 0] != 0).any()
