"""Layers written with weight_norm (vocoders, WaveNets) prune exactly; spectral_norm stays.

weight_norm computes ``w = g * v / ||v||``: a pruned layer keeps ``v``'s kept part and a
``g`` rescaled so that it computes exactly the kept part of ``w``. Checked in float64
against the unpruned model with the removed channels computed away, for both spellings
(the ``parametrizations`` one and the old hook), norms over outputs, inputs and the
whole tensor, a transposed conv and a Linear; then save, load and a second round.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils import spectral_norm as old_spectral_norm
from torch.nn.utils import weight_norm as old_weight_norm

import tdump.surgery as surgery
from tdump.surgery._weight_norm import copy_model, weight_norm_dim

from .zoo import assert_equivalent


def _old(mod: nn.Module, dim: int | None = 0) -> nn.Module:
    with warnings.catch_warnings():  # deprecated in torch, still what many vocoders use
        warnings.simplefilter("ignore", FutureWarning)
        return old_weight_norm(mod, dim=dim)


class Vocoder(nn.Module):
    """HiFi-GAN-like: weight-normed Conv1d, an upsampling ConvTranspose1d, a residual."""

    def __init__(self, ch: int = 16) -> None:
        super().__init__()
        wn = parametrizations.weight_norm
        self.pre = wn(nn.Conv1d(8, ch, 7, padding=3))
        self.up = _old(nn.ConvTranspose1d(ch, ch // 2, 4, stride=2, padding=1))  # norm per input
        self.res1 = _old(nn.Conv1d(ch // 2, ch // 2, 3, padding=1))
        self.res2 = wn(nn.Conv1d(ch // 2, ch // 2, 3, padding=1), dim=None)  # whole tensor
        self.mid = wn(nn.Conv1d(ch // 2, ch, 3, padding=1), dim=1)  # norm per input channel
        self.post = wn(nn.Conv1d(ch, 1, 7, padding=3))
        self.head = wn(nn.Linear(ch, 3), dim=None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.leaky_relu(self.pre(x), 0.1)
        x = self.up(x)
        x = x + self.res2(F.leaky_relu(self.res1(F.leaky_relu(x, 0.1)), 0.1))
        m = torch.tanh(self.mid(x))
        return self.post(m), self.head(m.mean(-1))


def _flat(y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.cat([y[0].flatten(1), y[1]], 1)


def _model() -> Vocoder:
    torch.manual_seed(0)
    model = Vocoder().double()
    with torch.no_grad():  # g away from ||v|| (its value at wrapping), with negative entries
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _scores(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    graph = surgery.build_graph(model)
    return {m: rng.random(g.size) for g in graph.groups if not g.frozen for m in g.members}


X = torch.randn(2, 8, 10, dtype=torch.float64)


def test_every_weight_norm_prunes_exactly_and_keeps_its_spelling() -> None:
    model = _model()
    before = _flat(model(X)).detach()
    scores = _scores(model, 0)
    assert set(scores) == {"pre", "up", "res1", "res2"}  # mid, post, head reach outputs
    pruned, plan = surgery.prune(model, scores, ratio=0.4)
    assert {"pre", "up", "res1", "res2"} <= set(plan.layers)
    assert_equivalent(model, pruned, plan, X, out=_flat)
    # the unpruned model is untouched (a deep copy shares parametrize's class with it)
    assert torch.equal(_flat(model(X)).detach(), before)
    assert parametrize.is_parametrized(pruned.pre) and hasattr(pruned.up, "weight_g")
    assert [weight_norm_dim(getattr(pruned, n)) for n in ("pre", "up", "res2", "mid")] == [
        0, 0, -1, 1,
    ]  # fmt: skip
    # g follows the kept slices: ||g'|| = ||w'|| per output (dim 0) / per input (dim 1)
    w = pruned.mid.weight.detach()
    g = pruned.mid.parametrizations.weight.original0.detach()
    assert torch.allclose(g.abs().flatten(), w.norm(dim=(0, 2)), rtol=1e-12)
    assert pruned.mid.parametrizations.weight.original1.shape == w.shape
    # and still trains: every g and v gets a gradient
    pruned.train()
    _flat(pruned(X)).sum().backward()
    assert all(p.grad is not None for p in pruned.parameters())


@pytest.mark.parametrize("plain", [False, True], ids=["tdump-checkpoint", "state_dict"])
def test_save_load_and_a_second_round(tmp_path, plain: bool) -> None:
    model = _model()
    pruned, _ = surgery.prune(model, _scores(model, 1), ratio=0.4)
    path = tmp_path / "p.pt"
    if plain:  # what a fine-tuning script writes: shapes only, no plan
        torch.save(pruned.state_dict(), path)
    else:
        surgery.save(path, pruned, arch=Vocoder)
    loaded = surgery.load(path, arch=Vocoder).double()
    # the old hook's weight is computed again at load, before any forward
    assert loaded.up.weight.shape == pruned.up.weight.shape
    assert torch.equal(loaded.up.weight, pruned.up.weight.detach())
    with torch.no_grad():
        assert torch.equal(_flat(loaded(X)), _flat(pruned(X)))
    again, plan2 = surgery.prune(loaded, _scores(loaded, 2), ratio=0.3)
    assert surgery.count_params(again) < surgery.count_params(loaded)
    assert_equivalent(loaded, again, plan2, X, out=_flat)


def test_layer_params_count_g_and_v() -> None:
    model = _model()
    own = {"pre": 16 + 16 + 16 * 8 * 7, "up": 16 + 8 + 16 * 8 * 4}  # g, bias, v
    assert {k: surgery.layer_params(model)[k] for k in own} == own


def test_copy_of_a_model_with_the_old_hook_after_training() -> None:
    """The old hook leaves its weight an autograd non-leaf, which deepcopy refuses."""
    model = nn.Sequential(_old(nn.Conv2d(3, 4, 3)), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model(torch.randn(1, 3, 5, 5)).sum().backward()
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    twin = copy_model(model)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("style", ["parametrizations", "hook"])
def test_spectral_norm_keeps_its_channels(style: str) -> None:
    """Pruning changes a spectral norm: no rescaling keeps the layer exact, so it stays."""
    wrap = parametrizations.spectral_norm if style == "parametrizations" else old_spectral_norm
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), wrap(nn.Conv2d(8, 6, 3)),
        nn.ReLU(), nn.Conv2d(6, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1),
    )  # fmt: skip
    graph = surgery.build_graph(model)
    reasons = {m: g.reason for g in graph.groups for m in g.members}
    assert reasons["0"].startswith("2 computes its weight (spectral_norm, a parametrization)")
    assert "remove_parametrizations" in reasons["0"] and graph.group_of("2") is None
    assert reasons["4"] == ""  # the layers after it still prune
    pruned, plan = surgery.prune(model, {"4": np.arange(4.0)}, count=2)
    assert set(plan.layers) == {"4"} and pruned[4].out_channels == 2
    assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 2, 4, 4)
