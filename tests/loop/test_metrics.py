"""The loop's measure stage rebuilding round 0's model from a plain state_dict and its dump."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

import tdump.surgery as surgery
from tdump.errors import CheckpointError
from tdump.loop._metrics import load_round_model

SCRIPT = """import torch, torchvision
from torch import nn
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=3)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(2):
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 3, (2,))).backward()
    opt.step()
torch.save(model.state_dict(), "model.pt")
"""


def test_round0_plain_state_dict_of_a_torchvision_model_needs_no_arch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tdump.cli.app import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(SCRIPT)
    argv = ["tdump", "record", "--out", "dump.zarr", "--interval", "1", "--strict", "train.py"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)

    model = load_round_model("model.pt", None, None, None, "dump.zarr")
    assert surgery.provenance(model).arch == "torchvision.models.resnet18"
    assert model.fc.out_features == 3  # num_classes from the state_dict's head
    saved = torch.load("model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert isinstance(model, torchvision.models.ResNet)
    # without the dump nothing says which model the state_dict belongs to
    with pytest.raises(CheckpointError, match="plain state_dict"):
        load_round_model("model.pt", None, None, None, None)
