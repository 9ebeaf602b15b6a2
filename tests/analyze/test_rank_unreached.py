"""Layers the backward pass never reaches (an auxiliary head left out of the loss) stay
unscored with a note, and the rest of the model still ranks and prunes.

GoogLeNet and Inception v3 return auxiliary logits in training; a script whose loss
reads only the main logits leaves those heads without gradients. Before, `tdump rank`
failed on the whole dump ("dump has no gradients for 'aux1.conv.bn.output_0'") and its
hint asked to record what was already recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tdump
from tdump._format import StoreReader
from tdump.analyze import rank_table
from tdump.errors import MissingTensorError

from .rank_helpers import RECORD_INCLUDE, reference


class AuxNet(nn.Module):
    """conv1 -> relu1 -> conv2 -> act2 -> fc, with an auxiliary conv head on relu1.

    The GELUs are named so that ``--include '.*relu'`` misses them: the loop's selection
    takes them by type (``include_activations``), the ReLU by its name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(6, 8, 3, padding=1), nn.GELU()
        self.fc = nn.Linear(8, 3)
        self.aux_conv, self.aux_act = nn.Conv2d(6, 5, 1), nn.GELU()
        self.aux_fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.relu1(self.conv1(x))
        main = self.fc(self.act2(self.conv2(y)).mean(dim=(2, 3)))
        return main, self.aux_fc(self.aux_act(self.aux_conv(y)).mean(dim=(2, 3)))


def _record(path: Path, *, aux_in_loss: bool = False, **settings: object) -> AuxNet:
    from tdump.capture import Hook

    torch.manual_seed(0)
    model, loss_fn = AuxNet(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    kw: dict[str, object] = {"include_regex": RECORD_INCLUDE, "include_activations": True}
    kw.update(settings)
    with Hook(str(path), save_interval=1, strict=True, **kw) as hook:  # type: ignore[arg-type]
        hook.register_module(model)
        hook.register_loss(loss_fn)
        for _ in range(3):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            main, aux = model(x)
            loss = loss_fn(main, y) + (0.3 * loss_fn(aux, y) if aux_in_loss else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


#: `tdump record`'s selection (weights too), and `tdump loop`'s (Taylor terms, no weights)
SELECTIONS = {"record": {}, "loop": {"include_regex": ".*relu", "reduction": "taylor"}}


@pytest.mark.parametrize("how", SELECTIONS)
def test_unreached_head_is_skipped_and_the_rest_ranks(tmp_path: Path, how: str) -> None:
    dump = tmp_path / "aux.zarr"
    model = _record(dump, **SELECTIONS[how])
    table = rank_table(str(dump))
    layers = set(table.columns["layer"])
    assert layers == {"conv1", "conv2"}, layers  # the aux head's conv is left out
    assert table.meta["skipped"].keys() == {"aux_conv"}
    (note,) = [n for n in table.meta["notes"] if "aux_conv" in n]
    assert "no gradient reached them in the recorded steps" in note
    assert "they keep all their channels" in note and "tdump record --include" not in note
    if how == "record":  # the scores of the reached layers are numpy's on the same tensors
        reader = StoreReader(str(dump))
        cols = table.columns
        got = cols["score"][cols["layer"] == "conv1"]
        want = reference(reader, "taylor", {0: "relu1.output_0", 1: "relu1.output_0.grad"})
        np.testing.assert_allclose(got, want, rtol=1e-6)

    # the surgery keeps the unscored head whole and the pruned model runs
    ranks = tdump.rank(str(dump))
    pruned, _ = tdump.prune(model, ranks, ratio=0.5)
    assert pruned.aux_conv.out_channels == 5 and pruned.conv2.out_channels < 8
    main, aux = pruned(torch.randn(2, 3, 8, 8))
    assert main.shape == aux.shape == (2, 3)


def test_gradients_the_selection_left_out_keep_the_record_hint(tmp_path: Path) -> None:
    # the aux head is in the loss, but --include takes aux_act's output and not its gradient
    dump = tmp_path / "sel.zarr"
    include = r"relu1|act2|aux_act\.output_0$|.*weight"
    _record(dump, aux_in_loss=True, include_regex=include, include_activations=False)
    table = rank_table(str(dump))
    (note,) = [n for n in table.meta["notes"] if "aux_conv" in n]
    assert "no gradient reached" not in note
    assert "activation gradients are not stored" in note and "tdump record --include" in note


def test_a_dump_without_any_output_gradient_still_fails(tmp_path: Path) -> None:
    dump = tmp_path / "nograd.zarr"
    no_grads = r"(?:relu1|act2|aux_act).*(?<!\.grad)$|.*weight"
    _record(dump, include_regex=no_grads, include_activations=False)
    with pytest.raises(MissingTensorError, match="no gradients for"):
        rank_table(str(dump))
