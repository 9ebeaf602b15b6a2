"""Pruned tensors equal numpy's np.delete of the same indices along the right axes (an independent computation)."""

from __future__ import annotations

import numpy as np
import torch

import tdump.surgery as surgery
from tests.surgery.helpers import randomize_bn
from tests.surgery.nets import TinyNet


def test_tensors_equal_np_delete() -> None:
    torch.manual_seed(1)
    model = randomize_bn(TinyNet())
    before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    s1 = np.array([0.9, 0.1, 0.8, 0.7, 0.05, 0.6, 0.5, 0.4])  # conv1: drop 1 and 4
    s2 = np.array(
        [0.3, 0.9, 0.01, 0.8, 0.7, 0.6]
    )  # conv2: drop 0 and 2 (25% of 6 rounds half up to 2)
    pruned, plan = surgery.prune(model, {"conv1": s1, "conv2": s2}, ratio=0.25, scope="per-layer")
    assert plan.layers["conv1"].keep == [0, 2, 3, 5, 6, 7]
    assert plan.layers["conv2"].keep == [1, 3, 4, 5]
    after = {k: v.detach().numpy() for k, v in pruned.state_dict().items()}
    d1, d2 = [1, 4], [0, 2]
    fc_cols = [
        c * 16 + j for c in d2 for j in range(16)
    ]  # flatten: channel c owns features c*16 .. c*16+15
    expected = {
        "conv1.weight": np.delete(before["conv1.weight"], d1, axis=0),
        "conv1.bias": np.delete(before["conv1.bias"], d1, axis=0),
        "bn1.weight": np.delete(before["bn1.weight"], d1),
        "bn1.bias": np.delete(before["bn1.bias"], d1),
        "bn1.running_mean": np.delete(before["bn1.running_mean"], d1),
        "bn1.running_var": np.delete(before["bn1.running_var"], d1),
        "bn1.num_batches_tracked": before["bn1.num_batches_tracked"],
        "conv2.weight": np.delete(np.delete(before["conv2.weight"], d2, axis=0), d1, axis=1),
        "conv2.bias": np.delete(before["conv2.bias"], d2),
        "fc.weight": np.delete(before["fc.weight"], fc_cols, axis=1),
        "fc.bias": before["fc.bias"],
    }
    assert sorted(after) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert (pruned.conv1.out_channels, pruned.conv2.in_channels, pruned.bn1.num_features) == (
        6,
        6,
        6,
    )
    assert (pruned.conv2.out_channels, pruned.fc.in_features) == (4, 64)
