"""A Linear on a channels-last tensor: capture stores and reduces along its features.

ViT's, Swin's and ConvNeXt's MLPs run a Linear on ``(batch, tokens, features)``: its
channels are the last axis. The hook must mark such outputs (``channel_axis`` -1,
dims ending in ``feature``) and take every reduce-at-source over the tokens, checked
here against numpy on the full tensors of the same training recorded without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tdump._format import StoreReader
from tests.analyze.rank_helpers import record_mlp

ACT = "tok_act.output_0"


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> StoreReader:
    path = tmp_path_factory.mktemp("full") / "dump.zarr"
    record_mlp(path)
    return StoreReader(str(path))


def _all(reader: StoreReader, name: str) -> np.ndarray:
    n = len(reader.records("train"))
    return np.concatenate([reader.read("train", name, i).astype(np.float64) for i in range(n)])


def test_channels_last_outputs_are_marked(full: StoreReader) -> None:
    act = full.tensor_attrs("train", ACT)
    assert act["channel_axis"] == -1 and tuple(act["dims"]) == ("batch", "x", "feature")
    assert full.tensor_attrs("train", ACT + ".grad")["channel_axis"] == -1
    # a conv's output and a 2-D Linear's keep their channels at dim 1, unmarked
    for name in ("relu.output_0", "act.output_0"):
        assert "channel_axis" not in full.tensor_attrs("train", name)
    assert _all(full, ACT).shape == (18, 36, 6)


@pytest.mark.parametrize(
    ("reduction", "expect"),
    [
        ("mean", lambda a: a.mean(axis=1)),
        ("abs_mean", lambda a: np.abs(a).mean(axis=1)),
        ("l2", lambda a: np.sqrt((a * a).sum(axis=1))),
    ],
)
def test_reductions_run_over_the_tokens(
    full: StoreReader, tmp_path: Path, reduction: str, expect: object
) -> None:
    path = tmp_path / f"{reduction}.zarr"
    record_mlp(path, reduction=reduction)  # same seeds: the same training as ``full``
    reader = StoreReader(str(path))
    attrs = reader.tensor_attrs("train", ACT)
    assert attrs["reduction"] == reduction and attrs["channel_axis"] == -1
    assert tuple(attrs["dims"]) == ("batch", "feature")
    for name in (ACT, ACT + ".grad"):
        want = expect(_all(full, name))  # type: ignore[operator]
        assert want.shape == (18, 6)
        np.testing.assert_allclose(_all(reader, name), want, rtol=1e-5, atol=1e-9)


def test_taylor_term_is_the_token_mean_of_a_times_g(full: StoreReader, tmp_path: Path) -> None:
    path = tmp_path / "taylor.zarr"
    record_mlp(path, reduction="taylor")
    reader = StoreReader(str(path))
    assert reader.tensor_attrs("train", ACT + ".taylor")["channel_axis"] == -1
    want = (_all(full, ACT) * _all(full, ACT + ".grad")).mean(axis=1)
    np.testing.assert_allclose(_all(reader, ACT + ".taylor"), want, rtol=1e-5, atol=1e-12)
