"""Legal PyTorch module names that are not plain keys record, reversibly, inside the store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdump._format import StoreReader, decode_name, encode_name
from tdump.capture import Hook

ODD = ["a/b", "x y", "h\u00e9", "%41", "-lead", "zarr"]


def test_odd_module_names_record_and_read_back(tmp_path) -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleDict({k: nn.Linear(3, 3) for k in ODD})
    model = nn.Module()
    model.blocks = blocks
    setattr(model, "..", nn.Linear(3, 3))  # setattr skips add_module's name checks
    model.forward = lambda x: sum(m(x) for m in [*blocks.values(), getattr(model, "..")])  # type: ignore[method-assign]
    out = tmp_path / "odd.zarr"
    with Hook(str(out), include_regex=r"weight|json", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        model(torch.randn(2, 3)).sum().backward()
    r = StoreReader(str(out))
    expected = {f"blocks.{k}.weight" for k in ODD} | {"...weight"}
    names = set(r.tensor_names("train"))
    assert expected | {n + ".grad" for n in expected} <= names
    for k in ODD:
        np.testing.assert_array_equal(
            r.array("train", f"blocks.{k}.weight")[0], blocks[k].weight.detach().numpy()
        )
    np.testing.assert_array_equal(
        r.array("train", "...weight")[0], getattr(model, "..").weight.detach().numpy()
    )
    # every file is inside the store's tensors folder, one folder per tensor
    tensors = out / "rank0" / "train" / "tensors"
    for path in Path(out).rglob("*"):
        assert os.path.realpath(path).startswith(os.path.realpath(out))
    assert len([p for p in tensors.iterdir() if p.is_dir()]) == len(names)


def test_encoding_round_trips() -> None:
    for name in [
        "layer1.0.conv1.weight",
        "a/b",
        "..",
        ".x.",
        "a..b",
        "%",
        "zarr.json",
        "\u00e9/\u4e2d",
    ]:
        key = encode_name(name)
        assert "/" not in key and ".." not in key and not key.startswith((".", "-"))
        assert decode_name(key) == name
    assert encode_name("layer1.0.conv1.weight") == "layer1.0.conv1.weight"
