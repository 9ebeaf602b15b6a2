"""Criteria registry and formulas on a tiny hand-written store (no torch): conv -> bn -> relu -> fc."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from tdump._dataflow import Dataflow
from tdump._format import StoreWriter
from tdump.analyze import Criterion, Plan, criteria, get_criterion, rank, register_criterion
from tdump.analyze._arith import _spatial_mean
from tdump.analyze._criteria import _REGISTRY, PlanContext
from tdump.errors import ConfigError

CONV = "torch.nn.modules.conv.Conv2d"
MODULES = {
    "": {"type": "Net", "params": {}, "buffers": {}, "config": {}},
    "conv": {"type": CONV, "params": {"weight": [3, 2, 1, 1]}, "config": {"out_channels": 3}},
    "bn": {"type": "torch.nn.modules.batchnorm.BatchNorm2d", "params": {"weight": [3]}},
    "act": {"type": "torch.nn.modules.activation.ReLU"},
    "pool": {"type": "torch.nn.modules.pooling.AdaptiveAvgPool2d"},
    "fc": {"type": "torch.nn.modules.linear.Linear", "config": {"out_features": 2}},
}
CALLS = [
    {"name": "conv.output_0", "module": "conv", "call": 0, "inputs": ["<input>"]},
    {"name": "bn.output_0", "module": "bn", "call": 0, "inputs": ["conv.output_0"]},
    {"name": "act.output_0", "module": "act", "call": 0, "inputs": ["bn.output_0"]},
    {"name": "pool.output_0", "module": "pool", "call": 0, "inputs": ["act.output_0"]},
    {"name": "fc.output_0", "module": "fc", "call": 0, "inputs": [None]},
]
ACT = np.array(
    [  # (record, batch=2, channel=3, y=1, x=2); channel 2 always zero
        [[[[1.0, 0.0]], [[2.0, 2.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[1.0, 3.0]], [[0.0, 0.0]]]],
        [[[[4.0, 4.0]], [[0.0, 1.0]], [[0.0, 0.0]]], [[[2.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]]],
    ],
    dtype=np.float32,
)
GRAD = np.where(ACT > 0, -0.5, 0.25).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("crit") / "tiny.zarr")
    w = StoreWriter.create(path)
    w.update_meta(modules=MODULES, calls={"train": CALLS})
    out = {"collection": "activations", "kind": "output", "module": "act", "call": 0}
    dims = ("batch", "channel", "y", "x")
    for rec in range(2):
        w.write_tensor("train", rec, "act.output_0", ACT[rec], dims=dims, attrs=out)
        w.write_tensor(
            "train",
            rec,
            "act.output_0.grad",
            GRAD[rec],
            dims=dims,
            attrs={**out, "kind": "output_grad"},
        )
        weight = np.arange(6, dtype=np.float32).reshape(3, 2, 1, 1) - 2 * rec
        w.write_tensor(
            "train", rec, "conv.weight", weight, dims=("out_channel", "in_channel", "ky", "kx")
        )
        w.write_tensor("train", rec, "conv.weight.grad", np.ones((3, 2, 1, 1), "f4") * (rec + 1))
        w.write_tensor(
            "train", rec, "bn.weight", np.array([0.5, -2.0, 1.0], "f4"), dims=("channel",)
        )
        w.commit("train", rec, step=10 * rec, batch_size=2)
    return path


def test_registry_names() -> None:
    assert criteria()[:6] == ["taylor", "taylor-signed", "l1", "bn-gamma", "apoz", "taylor-weight"]
    assert get_criterion("taylor", signed=True).name == "taylor-signed"
    with pytest.raises(ConfigError, match="taylor criterion only"):
        get_criterion("l1", signed=True)


def test_formulas(tiny: str) -> None:
    def score(name: str) -> list[float]:
        return rank(tiny, criterion=name, progress=False, scheduler="sync")["score"].tolist()

    prod = ACT.astype(np.float64) * GRAD
    per_example = prod.mean(axis=(3, 4)).reshape(4, 3)
    np.testing.assert_allclose(score("taylor"), np.abs(per_example).mean(0))
    np.testing.assert_allclose(score("taylor-signed"), per_example.mean(0))
    zeros = (ACT == 0).mean(axis=(3, 4)).reshape(4, 3)
    np.testing.assert_allclose(score("apoz"), 1 - zeros.mean(0))
    assert score("apoz")[2] == 0.0  # a dead channel is the least important
    np.testing.assert_allclose(score("l1"), [2 + 1, 0 + 1, 2 + 3])  # last record: w - 2
    np.testing.assert_allclose(score("bn-gamma"), [0.5, 2.0, 1.0])
    w0 = np.arange(6).reshape(3, 2).sum(1)
    w1 = (np.arange(6).reshape(3, 2) - 2).sum(1) * 2
    np.testing.assert_allclose(score("taylor-weight"), (w0**2 + w1**2) / 2)


def test_plugin_criterion_needs_no_other_change(tiny: str) -> None:
    @register_criterion("test-mean-abs")
    class MeanAbs(Criterion):
        uses_batch = True

        def plan(self, layer: str, ctx: PlanContext) -> Plan | None:
            act = ctx.activation(layer)
            return None if act is None else Plan({"act": act})

        def partial(self, values: Mapping[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, int]:
            a = values["act"]
            return _spatial_mean(np.abs(a)).sum(axis=0), a.shape[0]

    try:
        df = rank(tiny, criterion="test-mean-abs", progress=False, normalize=False)
        expect = np.abs(ACT).mean(axis=(3, 4)).reshape(4, 3).mean(0)
        np.testing.assert_allclose(df["score"], expect)
        assert set(df["criterion"]) == {"test-mean-abs"} and set(df["examples"]) == {4}
    finally:
        _REGISTRY.pop("test-mean-abs")


def test_dataflow_stops_at_non_channel_modules() -> None:
    flow = Dataflow(MODULES, CALLS)
    assert flow.convs() == ["conv"]
    assert flow.producing_conv("pool.output_0") == "conv"
    assert flow.producing_conv("fc.output_0") is None
    assert flow.producing_conv("missing.output_0") is None
    assert flow.outputs_by_conv(["pool.output_0", "act.output_0", "bn.output_0"]) == {
        "conv": ["act.output_0", "pool.output_0", "bn.output_0"]
    }
    assert flow.out_channels("conv") == 3


def test_dataflow_walks_back_through_group_norms() -> None:
    """conv -> GroupNorm -> ReLU (ResNet-GN, diffusion U-Nets): the ReLU ranks the conv."""
    gn = {"type": "torch.nn.modules.normalization.GroupNorm"}
    flow = Dataflow({**MODULES, "bn": gn}, CALLS)
    assert flow.producing_conv("act.output_0") == "conv"
    flow = Dataflow({**MODULES, "bn": {"type": "torch.nn.modules.normalization.LayerNorm"}}, CALLS)
    assert flow.producing_conv("act.output_0") is None  # mixes channels: not one to one


def test_dataflow_passes_instance_norms_and_ranks_transposed_convs() -> None:
    """Fast neural style's conv -> InstanceNorm -> ReLU, and a decoder's ConvTranspose2d."""
    modules = {
        **MODULES,
        "bn": {"type": "torch.nn.modules.instancenorm.InstanceNorm2d"},
        "up": {
            "type": "torch.nn.modules.conv.ConvTranspose2d",
            "params": {"weight": [3, 5, 2, 2]},
            "config": {"groups": 1},
        },
        "up2": {"type": "torch.nn.modules.conv.ConvTranspose2d", "config": {"groups": 3}},
    }
    calls = [
        *CALLS[:3],
        {"name": "up.output_0", "module": "up", "call": 0, "inputs": ["act.output_0"]},
    ]
    flow = Dataflow(modules, calls)
    assert flow.producing_conv("act.output_0") == "conv"
    # a grouped transposed conv is not ranked (the surgery cannot prune it)
    assert flow.convs() == ["conv", "up"] and flow.out_channels("up") == 5
