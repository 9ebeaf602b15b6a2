"""Models whose own forward torch.fx cannot follow (torchvision's detection models):
traced in parts, each part's inner channels pruned exactly, the rest left alone.

Equivalence is checked independently of the channel graph (``zoo.reference_output``:
the unpruned model with the removed channels computed away by forward hooks), in
float64, on the detections themselves (boxes and scores after NMS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tdump.surgery as surgery
from tdump.errors import UntraceableModelError
from tests.surgery import zoo

DETECTOR = "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn"
KWARGS = {"num_classes": 5, "box_score_thresh": 0.0}  # every box kept: a real comparison


def test_detection_model_prunes_its_backbone_and_box_head_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = surgery.build_arch(DETECTOR, KWARGS).double().eval()  # no backbone download
    graph = surgery.build_graph(model)
    assert graph.parts == ["backbone.", "roi_heads.box_head.", "rpn.head.conv."]
    (note,) = [n for n in graph.notes if "its parts were traced" in n]
    assert note.endswith("--input-shape C,H,W (input_shape= in Python)")
    assert note.startswith("FasterRCNN.forward cannot be traced (Proxy object cannot be iterated)")
    pruned, plan = surgery.prune(model, zoo.l1_scores(model), ratio=0.3, scope="per-layer")
    assert pruned.roi_heads.box_head.fc6.out_features < 1024
    assert pruned.roi_heads.box_head.fc7.in_features == pruned.roi_heads.box_head.fc6.out_features
    assert any(name.startswith("backbone.body.") for name in plan.layers)
    # the parts' outputs are read by code fx cannot see: never pruned
    assert pruned.backbone.fpn.layer_blocks[0][0].out_channels == 256
    assert pruned.rpn.head.cls_logits.in_channels == 256

    images = [torch.rand(3, 128, 160, dtype=torch.float64)]
    ref = zoo.detections(zoo.reference_output(model, plan, images))
    with torch.no_grad():
        got = zoo.detections(pruned(images))
    assert got.shape == ref.shape and ref.numel() >= 100
    assert (got - ref).abs().max().item() < 1e-9

    path = tmp_path / "det.pt"
    surgery.save(path, pruned, arch=DETECTOR, arch_kwargs=KWARGS)
    back = surgery.load(path).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(zoo.detections(back(images)), got, rtol=0, atol=1e-12)

    back.train()  # a fine-tuning step on the pruned detector
    target = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
    losses = back(
        [images[0]], [{k: v.double() if v.is_floating_point() else v for k, v in target.items()}]
    )
    sum(losses.values()).backward()  # type: ignore[union-attr]
    assert back.roi_heads.box_head.fc6.weight.grad is not None


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Post(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(6, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class ListModel(nn.Module):
    """Takes a list of images, as a detector does: its forward cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()  # only called: a part
        self.post = Post()  # also reached into (self.post.a): left alone
        self.blocks = nn.ModuleList([Post(), Post()])  # iterated: left alone

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for x in images:
            y = self.stem(x[None])
            for block in self.blocks:
                y = block(y)
            out.append(self.post(y) + self.post.a.bias.sum())
        return torch.cat(out)


class HandsSelfOn(ListModel):
    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return _run(self, images)


def _run(model: ListModel, images: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model.post(model.stem(x[None])) for x in images])


def test_only_children_the_code_just_calls_are_parts() -> None:
    torch.manual_seed(0)
    model = ListModel().double().eval()
    graph = surgery.build_graph(model)
    assert graph.parts == ["stem."]
    scores = {
        n: np.arange(float(m.out_channels))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    pruned, plan = surgery.prune(model, scores, ratio=0.5, scope="per-layer")
    assert set(plan.layers) == {"stem.net.0"}  # stem.net.2 leaves the part: frozen
    assert pruned.stem.net[0].out_channels == 4 and pruned.stem.net[2].in_channels == 4
    assert pruned.post.a.out_channels == 8 and pruned.blocks[0].a.out_channels == 8
    images = [torch.rand(3, 5, 5, dtype=torch.float64) for _ in range(2)]
    zoo.assert_equivalent(model, pruned, plan, images)  # type: ignore[arg-type]

    ignored = surgery.build_graph(model, ignore=r"^stem\.net\.0$")
    assert all(g.frozen for g in ignored.groups if "stem.net.0" in g.members)


def test_a_forward_that_hands_self_on_has_no_parts() -> None:
    """`_run(self, ...)` could reach any submodule: nothing is pruned, and the error says
    the root's code fails (as before parts existed)."""
    with pytest.raises(
        UntraceableModelError, match=r"the failing code is in HandsSelfOn\.forward itself"
    ):
        surgery.build_graph(HandsSelfOn())


def test_inferring_a_detectors_architecture_downloads_nothing(tmp_path: Path) -> None:
    """The candidates are built with weights_backbone=None (their default downloads
    ImageNet weights, which fails offline): the two builders of identical state_dicts
    are both named, and nothing else went wrong."""
    from tdump.errors import CheckpointError

    model = surgery.build_arch(DETECTOR, {"num_classes": 2})
    torch.save(model.state_dict(), tmp_path / "det.pt")
    with pytest.raises(CheckpointError) as err:
        surgery.load(
            tmp_path / "det.pt", model_type="torchvision.models.detection.faster_rcnn.FasterRCNN"
        )
    text = str(err.value)
    assert (
        "several builders match: torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn, "
        in text
    )
    assert "URLError" not in text and "raised when built" not in text
    from tdump.surgery._arch_fit import arch_for_type

    guess = arch_for_type(
        "torchvision.models.detection.faster_rcnn.FasterRCNN", model.state_dict(), {}
    )
    assert guess.arch is None and guess.tied == (
        "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn",
        "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn",
    )
    assert (
        "pass --arch: a registered name (e.g. --arch torchvision.models.detection.fasterrcnn_"
        in text
    )
