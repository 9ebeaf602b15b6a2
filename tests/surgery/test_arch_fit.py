"""Builder keywords a plain state_dict says: ``image_size`` of a ViT built for small images.

A user trains ``vit_b_32(image_size=64)`` and saves its state_dict; round 1's
``tdump prune ckpt.pt ranks.parquet`` must build the same model without being told the
size, and round 2 must read it from the pruned checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import tdump.surgery as surgery
from tdump.errors import CheckpointError
from tdump.surgery import _arch
from tdump.surgery._arch_fit import arch_for_type, infer_image_size


def tiny_vit(image_size: int = 32, num_classes: int = 10) -> VisionTransformer:
    """torchvision's ViT, one small block: patch 8, width 16, MLP 32."""
    return VisionTransformer(image_size, 8, 1, 2, 16, 32, num_classes=num_classes)


@pytest.fixture
def registered() -> Iterator[str]:
    before = dict(_arch._USER)
    surgery.register_arch("tiny_vit", tiny_vit)
    yield "tiny_vit"
    _arch._USER.clear()
    _arch._USER.update(before)


def test_image_size_from_the_position_embedding(tmp_path: Path, registered: str) -> None:
    torch.manual_seed(0)
    model = tiny_vit(image_size=64, num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")

    loaded = surgery.load(tmp_path / "ckpt.pt", registered).eval()
    notes = surgery.provenance(loaded).notes
    assert any("image_size=64 inferred" in n for n in notes), notes
    assert any("num_classes=4 inferred" in n for n in notes), notes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    hidden = "encoder.layers.encoder_layer_0.mlp.0"  # the MLP's 32 hidden features
    scores = {hidden: np.random.default_rng(1).uniform(0.1, 1.0, 32)}
    pruned, _ = surgery.prune(loaded, scores, ratio=0.25)
    assert pruned.get_submodule(hidden).out_features == 24
    surgery.save(tmp_path / "pruned.pt", pruned)
    raw = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert raw["arch_kwargs"] == {"num_classes": 4, "image_size": 64}
    again = surgery.load(tmp_path / "pruned.pt").eval()
    assert not any("inferred" in n for n in surgery.provenance(again).notes)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned.eval()(x), rtol=0, atol=0)

    # a size the user gives is used as given, and a wrong one is refused
    with pytest.raises(CheckpointError, match="pos_embedding"):
        surgery.load(tmp_path / "ckpt.pt", registered, {"image_size": 32})


def test_the_size_must_rebuild_the_embedding() -> None:
    """No size for a state_dict whose embedding no image size makes, nor for other models."""
    sd = tiny_vit(image_size=64).state_dict()
    assert infer_image_size(tiny_vit, {}, sd) == 64
    assert infer_image_size(tiny_vit, {}, tiny_vit().state_dict()) is None  # the default
    assert infer_image_size(tiny_vit, {"image_size": 48}, sd) is None  # given
    odd = {**sd, "encoder.pos_embedding": torch.zeros(1, 20, 16)}  # 19 patches: no square
    assert infer_image_size(tiny_vit, {}, odd) is None
    wide = {**sd, "encoder.pos_embedding": torch.zeros(1, 65, 24)}  # another width
    assert infer_image_size(tiny_vit, {}, wide) is None
    resnet = torchvision.models.resnet18
    assert infer_image_size(resnet, {}, resnet(num_classes=3).state_dict()) is None


def test_recorded_vit_class_finds_builder_and_size() -> None:
    """A vit_b_32 trained at 64x64 matches vit_b_32 exactly, not as a pruned fit."""
    with torch.device("meta"):  # shapes only: no 350 MB of weights
        sd = torchvision.models.vit_b_32(image_size=64, num_classes=10).state_dict()
    assert infer_image_size(torchvision.models.vit_b_32, {}, sd) == 64
    guess = arch_for_type("torchvision.models.vision_transformer.VisionTransformer", sd, {})
    assert guess.arch == "torchvision.models.vit_b_32", guess.why
