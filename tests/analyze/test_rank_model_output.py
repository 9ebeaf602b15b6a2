"""A conv whose channels are the model's outputs (a segmentation head's classes, the conv
before a super-resolution net's ``PixelShuffle``) gets no "record more" advice.

Before, `tdump rank` told the user to record ``cls.output_0`` with its gradient to score
the head, though `tdump prune` never removes those channels. The capture now records
which calls the model returns as they are (``model_outputs``), and the note says that
the layer needs no score.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tdump
from tdump._format import StoreReader
from tdump.analyze import rank_table

from .rank_helpers import RECORD_INCLUDE


class SegNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> 1x1 conv to 5 classes per pixel; ``tail`` adds a
    functional op after the head (the model output is then no module's output)."""

    def __init__(self, tail: bool = False) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(8, 5, 1)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cls(self.mid(self.enc(x)))
        return nn.functional.interpolate(y, scale_factor=2.0) if self.tail else y


class SuperRes(nn.Module):
    """conv -> ReLU -> conv to 3 * 2**2 channels -> PixelShuffle(2): an ESPCN-like net."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.up = nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.up(self.body(x)))


def _record(path: Path, model: nn.Module) -> nn.Module:
    """Three SGD steps of a per-pixel regression under a strict Hook, every step saved
    (`tdump record`'s selection: the ReLUs by type), then one eval forward."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with tdump.Hook(
        str(path),
        include_regex=RECORD_INCLUDE,
        include_activations=True,
        save_interval=1,
        strict=True,
    ) as hook:
        hook.register_module(model)
        for _ in range(3):
            x = torch.randn(2, 3, 8, 8, generator=g)
            out = model(x)
            loss = (out - torch.randn(out.shape, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()  # an eval forward after training: its mode is traced too
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8, generator=g))
        model.train()
    return model


@pytest.mark.parametrize(
    ("make", "head", "returned"),
    [(SegNet, "cls", "cls.output_0"), (SuperRes, "up", "shuffle.output_0")],
)
def test_the_output_layer_needs_no_score_and_prune_keeps_it(
    tmp_path: Path, make: type[nn.Module], head: str, returned: str
) -> None:
    dump = tmp_path / "d.zarr"
    model = _record(dump, make())
    assert StoreReader(str(dump)).meta(0)["model_outputs"] == {
        "train": [returned],
        "eval": [returned],
    }

    for criterion in ("taylor", "l1"):  # l1 could score it from its weights: it is left out
        table = rank_table(str(dump), criterion=criterion)
        assert head not in set(table.columns["layer"]) and head in table.meta["skipped"]
        (note,) = [n for n in table.meta["notes"] if f"({head})" in n]
        assert "their channels are the model's outputs" in note, note
        assert "need no score" in note and "tdump record --include" not in note, note
    # asked for by name, it is scored
    named = rank_table(str(dump), criterion="l1", layers=f"^{head}$")
    assert set(named.columns["layer"]) == {head}

    # what the note promises, checked against the surgery: the head keeps every channel
    channels = getattr(model, head).out_channels
    pruned, _ = tdump.prune(model, tdump.rank(str(dump)), ratio=0.5)
    assert getattr(pruned, head).out_channels == channels
    x = torch.randn(2, 3, 8, 8)
    assert pruned(x).shape == model(x).shape


def test_a_functional_output_keeps_the_record_hint(tmp_path: Path) -> None:
    """The model returns ``interpolate(cls(x))``: no module call is the output, so the dump
    cannot tell, and the note keeps its advice (the loop, which has the model, corrects it)."""
    dump = tmp_path / "tail.zarr"
    _record(dump, SegNet(tail=True))
    assert StoreReader(str(dump)).meta(0)["model_outputs"] == {"train": [], "eval": []}
    (note,) = [n for n in rank_table(str(dump)).meta["notes"] if "(cls)" in n]
    assert "tdump record --include" in note and "model's outputs" not in note, note


def test_a_dump_without_model_outputs_reads_as_before(tmp_path: Path) -> None:
    """Dumps written before ``model_outputs`` was recorded rank as they did."""
    import json

    dump = tmp_path / "old.zarr"
    _record(dump, SegNet())
    meta_file = dump / "rank0" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    del doc["attributes"]["tdump"]["model_outputs"]
    meta_file.write_text(json.dumps(doc))
    table = rank_table(str(dump))
    assert set(table.columns["layer"]) == {"enc.0", "mid.0"}
    (note,) = [n for n in table.meta["notes"] if "(cls)" in n]
    assert "tdump record --include" in note, note
