"""Every element-wise activation passes channels through; a per-channel PReLU is sliced.

Equivalence is checked independently of the channel graph (``zoo.zeroed_reference``),
in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tdump.surgery as surgery
from tests.surgery import zoo
from tests.surgery.nets import PReLUNet

ACTIVATIONS = [
    nn.Hardtanh(-2.0, 2.0),
    nn.Softplus(),
    nn.LogSigmoid(),
    nn.CELU(),
    nn.RReLU(),
    nn.Softsign(),
    nn.Tanhshrink(),
    nn.Threshold(0.1, -1.0),
    nn.Hardshrink(),
    nn.Softshrink(),
    nn.PReLU(),
    nn.FeatureAlphaDropout(),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: type(a).__name__)
def test_activation_modules_pass_the_channels(act: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), act, nn.Conv2d(8, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 2),
    ).double().eval()  # fmt: skip
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.4)
    assert {"0", "2"} <= set(plan.layers)
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_functional_activations_pass_the_channels() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.softplus(self.a(x)).tanh_()
            x = F.dropout2d(F.celu(self.b(x)), 0.2, self.training)
            x = F.hardshrink(F.selu(x)) + F.logsigmoid(x).sigmoid_()
            return self.c(F.softsign(F.rrelu(x, training=self.training)))

    model = Functional().double().eval()
    groups = {m: g.frozen for g in surgery.build_graph(model).groups for m in g.members}
    assert groups == {"a": False, "b": False, "c": True}  # c reaches the output
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.4)
    zoo.assert_equivalent(model, pruned, plan, torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_per_channel_prelu_prunes_saves_loads_and_prunes_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PReLUNet().double().eval()
    for m in model.modules():  # distinct slopes, so a wrong slice shows
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(-0.5, 0.5)
    frozen = {m for g in surgery.build_graph(model).groups if g.frozen for m in g.members}
    assert frozen == {"fc"}
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3)
    assert pruned.prelu.num_parameters == pruned.stem.out_channels < 16
    assert pruned.blocks[0].prelu.weight.shape == (pruned.blocks[0].conv1.out_channels,)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    zoo.assert_equivalent(model, pruned, plan, x)

    path = tmp_path / "prelu.pt"
    surgery.save(path, pruned, arch="tests.surgery.nets.PReLUNet")
    back = surgery.load(path, arch=PReLUNet).eval().double()
    assert back.prelu.num_parameters == pruned.prelu.num_parameters
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)
    again, plan2 = surgery.prune(back, zoo.l1_scores(back), ratio=0.3)
    zoo.assert_equivalent(back, again, plan2, x)
    zoo._train_step(again, x)


def test_a_prelu_whose_slopes_do_not_match_its_input_freezes_it() -> None:
    wrong = nn.Sequential(nn.Conv2d(3, 8, 1), nn.PReLU(3), nn.Conv2d(8, 2, 1))
    grp = surgery.build_graph(wrong).group_of("0")
    assert grp is not None and grp.frozen and grp.reason == "1 does not match its input"
