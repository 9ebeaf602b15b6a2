"""Hidden Linear layers rank like convs: an MLP head's features, scored, pruned, run.

A model whose head is ``Linear -> ReLU -> Dropout -> Linear`` (VGG's, AlexNet's and
MobileNetV3's shape) is trained under the real hook; ``tdump.rank`` must score the
hidden Linear's features exactly as numpy does from the stored tensors, score a
Linear on a channels-last ``(batch, tokens, features)`` tensor along its last axis
(ViT's, Swin's and ConvNeXt's MLPs), leave the last Linears (the classes) alone, and
its ranks must prune the hidden features through the surgery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tdump
from tdump._format import StoreReader
from tests.analyze.rank_helpers import MLPHead, record_mlp


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MLPHead]:
    path = tmp_path_factory.mktemp("mlp") / "dump.zarr"
    return path, record_mlp(path)


def _by_layer(ranks: object) -> dict[str, np.ndarray]:
    df = ranks  # a pandas DataFrame
    return {
        str(layer): part.sort_values("channel")["score"].to_numpy()
        for layer, part in df.groupby("layer", sort=False)  # type: ignore[attr-defined]
    }


def test_taylor_scores_the_hidden_linear_like_numpy(dump: tuple[Path, MLPHead]) -> None:
    path, _ = dump
    scores = _by_layer(tdump.rank(path))
    # the hidden Linears are ranked; the classes (fc2, tok_out) are not
    assert sorted(scores) == ["conv", "fc1", "tok"]
    reader = StoreReader(str(path))
    steps = reader.records("train")["step"]

    def products(act: str) -> np.ndarray:
        return np.concatenate(
            [
                reader.read("train", act, i).astype(np.float64)
                * reader.read("train", act + ".grad", i).astype(np.float64)
                for i in range(len(steps))
            ]
        )

    expected = np.abs(products("act.output_0")).mean(axis=0)  # per feature, over every example
    assert len(steps) == 3 and expected.shape == (12,)
    np.testing.assert_allclose(scores["fc1"], expected, rtol=1e-12)
    # (examples, 36 tokens, 6 features): the mean over tokens, then |.| over examples
    tok = products("tok_act.output_0")
    assert tok.shape == (18, 36, 6)
    # float32 a*g summed in float32 runs (docs/ranking.md): within 1e-6 of sum |a*g|
    bound = 1e-6 * np.abs(tok).mean(axis=1).mean(axis=0)
    np.testing.assert_allclose(
        scores["tok"], np.abs(tok.mean(axis=1)).mean(axis=0), atol=bound.max()
    )


def test_l1_scores_the_hidden_linear_rows(dump: tuple[Path, MLPHead]) -> None:
    path, _ = dump
    scores = _by_layer(tdump.rank(path, criterion="l1"))
    assert sorted(scores) == ["conv", "fc1", "tok"]
    reader = StoreReader(str(path))
    last = len(reader.records("train")["step"]) - 1
    for layer in ("fc1", "tok"):
        w = reader.read("train", f"{layer}.weight", last).astype(np.float64)
        np.testing.assert_allclose(scores[layer], np.abs(w).sum(axis=1), rtol=1e-12)


def test_apoz_reads_a_channels_last_relu_along_its_features(tmp_path: Path) -> None:
    path = tmp_path / "relu.zarr"
    record_mlp(path, token_act="relu")
    scores = _by_layer(tdump.rank(path, criterion="apoz"))
    reader = StoreReader(str(path))
    acts = np.concatenate(
        [reader.read("train", "tok_act.output_0", i) for i in range(len(reader.records("train")))]
    )
    assert acts.shape[-1] == 6 and (acts == 0).mean() > 0.1
    np.testing.assert_allclose(scores["tok"], 1 - (acts == 0).mean(axis=(0, 1)), rtol=1e-12)
    # at source, the fraction of zeros is taken over the tokens: the same scores
    reduced = tmp_path / "zeros.zarr"
    record_mlp(reduced, reduction="zero_fraction", token_act="relu")
    at_source = _by_layer(tdump.rank(reduced, criterion="apoz"))
    np.testing.assert_allclose(at_source["tok"], scores["tok"], rtol=1e-6)


def test_taylor_at_source_gives_the_same_linear_scores(
    dump: tuple[Path, MLPHead], tmp_path: Path
) -> None:
    path, _ = dump
    reduced = tmp_path / "reduced.zarr"
    record_mlp(reduced, reduction="taylor")  # same seed, same data: the same training
    full = _by_layer(tdump.rank(path))
    at_source = _by_layer(tdump.rank(reduced))
    assert sorted(at_source) == ["conv", "fc1", "tok"]
    np.testing.assert_allclose(at_source["fc1"], full["fc1"], rtol=1e-5)
    np.testing.assert_allclose(at_source["tok"], full["tok"], rtol=1e-5)


def test_linear_ranks_prune_the_hidden_features(dump: tuple[Path, MLPHead]) -> None:
    path, model = dump
    ranks = tdump.rank(path)
    fc1 = ranks[ranks.layer == "fc1"].sort_values("score")
    weakest = set(fc1.channel.head(5).tolist())
    pruned, plan = tdump.prune(model, ranks[ranks.layer == "fc1"], count=5)
    assert plan.removed == 5 and list(plan.layers["fc1"].keep) == sorted(set(range(12)) - weakest)
    assert pruned.fc1.out_features == 7 and pruned.fc2.in_features == 7
    assert pruned.conv.out_channels == 8  # only the selected layer lost channels
    kept = [c for c in range(12) if c not in weakest]
    np.testing.assert_array_equal(pruned.fc1.weight.detach(), model.fc1.weight.detach()[kept])
    # the pruned model computes what the unpruned one does with those features zeroed out
    model.eval()
    pruned.eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        mask = torch.ones(12)
        mask[sorted(weakest)] = 0
        h = model.relu(model.bn(model.conv(x)))
        head = model.fc2(model.act(model.fc1(model.pool(h).flatten(1))) * mask)
        tokens = model.tok_out(model.tok_act(model.tok(h.flatten(2).transpose(1, 2)))).mean(1)
        torch.testing.assert_close(pruned(x), head + tokens)


def test_channels_last_ranks_prune_the_token_features(dump: tuple[Path, MLPHead]) -> None:
    path, model = dump
    ranks = tdump.rank(path, layers="^tok$")
    tok = ranks.sort_values("score")
    weakest = sorted(tok.channel.head(2).tolist())
    pruned, plan = tdump.prune(model, ranks, count=2)
    assert plan.removed == 2 and pruned.tok.out_features == 4 and pruned.tok_out.in_features == 4
    model.eval()
    pruned.eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        mask = torch.ones(6)
        mask[weakest] = 0  # the features are the last axis of (batch, tokens, features)
        h = model.relu(model.bn(model.conv(x)))
        head = model.fc2(model.act(model.fc1(model.pool(h).flatten(1))))
        tok = model.tok_act(model.tok(h.flatten(2).transpose(1, 2))) * mask
        torch.testing.assert_close(pruned(x), head + model.tok_out(tok).mean(1))


def _call(name: str, inputs: list[str | None], shape: list[int]) -> dict[str, object]:
    return {"name": f"{name}.output_0", "module": name, "call": 0, "inputs": inputs, "shape": shape}


def test_which_linears_are_hidden() -> None:
    from tdump._dataflow import Dataflow

    types = {
        "fc1": "torch.nn.modules.linear.Linear",
        "norm": "torch.nn.modules.normalization.LayerNorm",
        "fc2": "torch.nn.modules.linear.Linear",
        "fc3": "torch.nn.modules.linear.Linear",
        "soft": "torch.nn.modules.activation.Softmax",
        "tok": "torch.nn.modules.linear.Linear",
        "gelu": "torch.nn.modules.activation.GELU",
        "tok_out": "torch.nn.modules.linear.Linear",
        "tbn": "torch.nn.modules.linear.Linear",
        "bn": "torch.nn.modules.batchnorm.BatchNorm1d",
        "after_bn": "torch.nn.modules.linear.Linear",
    }
    calls = [
        _call("fc1", ["<input>"], [4, 16]),
        _call("norm", ["fc1.output_0"], [4, 16]),  # a LayerNorm between: still hidden
        _call("fc2", ["norm.output_0"], [4, 8]),
        _call("fc3", ["fc2.output_0"], [4, 3]),
        _call("soft", ["fc3.output_0"], [4, 3]),  # the classes, through a Softmax module
        _call("tok", ["<input>"], [4, 5, 6]),  # channels-last: features on the last axis
        _call("gelu", ["tok.output_0"], [4, 5, 6]),
        _call("tok_out", ["gelu.output_0"], [4, 5, 2]),
        # a BatchNorm1d on (batch, tokens, features) normalizes per token: it mixes features
        _call("tbn", ["<input>"], [4, 5, 6]),
        _call("bn", ["tbn.output_0"], [4, 5, 6]),
        _call("after_bn", ["bn.output_0"], [4, 5, 2]),
    ]
    flow = Dataflow({k: {"type": v} for k, v in types.items()}, calls)
    assert flow.layers() == ["fc1", "fc2", "tok", "tbn"]
    assert flow.producing_conv("fc2.output_0") == "fc2"
    assert flow.producing_conv("soft.output_0") is None
    assert flow.producing_conv("gelu.output_0") == "tok"
    assert flow.producing_conv("tok_out.output_0") is None  # the classes
    assert [flow.channels_last(x) for x in ("fc1", "tok", "tbn")] == [False, True, True]
    assert flow.producing_conv("tbn.output_0") == "tbn"
    assert flow.producing_conv("bn.output_0") is None
    assert flow.following_bn("tbn") is None
