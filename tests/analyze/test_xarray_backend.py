"""engine="tdump": xr.open_dataset / xr.open_datatree / xr.open_groups, and the Dataset accessor."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from tdump.analyze import TdumpBackendEntrypoint
from tdump.errors import ConfigError, MissingTensorError
from tests.conftest import SmallDump


def test_engine_is_registered() -> None:
    assert "tdump" in xr.backends.list_engines()


def test_open_dataset_flat_mode(small_dump: SmallDump) -> None:
    ds = xr.open_dataset(small_dump.path, engine="tdump", mode="train")
    assert set(ds.tdump.names()) == set(small_dump.names("train"))
    assert ds["conv1.weight"].dims == ("step", "out_channel", "in_channel", "ky", "kx")
    # channel sizes 4 (conv1, relu.output_0) and 8 (relu.output_1) in one Dataset
    assert ds["relu.output_1"].dims == ("step", "batch", "channel_8", "y_3", "x_3")
    assert ds["conv1.bias"].dims == ("step", "channel_4")
    assert isinstance(ds["relu.output_0"].data, da.Array)
    assert ds.attrs["mode"] == "train" and "conv1" in ds.tdump.modules
    np.testing.assert_array_equal(
        ds.tdump.tensor("conv1.weight").sel(step=10).values,
        small_dump.values[("train", "conv1.weight", 10)],
    )
    assert ds.tdump.collections["scalars"] == ["scalars.epoch", "scalars.lr"]
    assert ds.tdump.names(r"\.grad$") == ["conv1.weight.grad", "relu.output_0.grad"]
    with pytest.raises(MissingTensorError, match="did you mean"):
        ds.tdump.tensor("conv1.weigth")


def test_chunks_argument_keeps_one_record_per_chunk(small_dump: SmallDump) -> None:
    ds = xr.open_dataset(small_dump.path, engine="tdump", chunks={})
    assert ds["relu.output_0"].data.chunks[0] == (1, 1, 1)
    ds = xr.open_dataset(small_dump.path, engine="tdump", chunks={"step": 2})
    assert ds["relu.output_0"].data.chunks[0] == (2, 1)
    np.testing.assert_array_equal(
        ds["conv1.weight"].sel(step=20).values, small_dump.values[("train", "conv1.weight", 20)]
    )


def test_open_dataset_default_mode_and_drop(small_dump: SmallDump) -> None:
    ds = xr.open_dataset(small_dump.path, engine="tdump", drop_variables=["relu.output_1"])
    assert ds.attrs["mode"] == "train"
    assert "relu.output_1" not in ds and "relu.output_0" in ds


def test_open_dataset_group(small_dump: SmallDump) -> None:
    node = xr.open_dataset(small_dump.path, engine="tdump", group="eval/relu")
    assert list(node.data_vars) == ["output_0"]
    assert node.coords["step"].values.tolist() == [0, 5]
    same = xr.open_dataset(small_dump.path, engine="tdump", mode="eval", group="relu")
    xr.testing.assert_identical(node, same)
    top = xr.open_dataset(small_dump.path, engine="tdump", group="train")
    assert "scalars.lr" in top
    with pytest.raises(MissingTensorError, match="did you mean 'relu'"):
        xr.open_dataset(small_dump.path, engine="tdump", group="train/rleu")


def test_open_datatree_and_groups(small_dump: SmallDump) -> None:
    dt = xr.open_datatree(small_dump.path, engine="tdump")
    assert list(dt.children) == ["train", "eval"]
    sub = xr.open_datatree(small_dump.path, engine="tdump", group="train")
    assert set(sub.children) == {"conv1", "relu", "loss"}
    groups = xr.open_groups(small_dump.path, engine="tdump", mode="eval")
    assert set(groups) == {"/", "/relu", "/loss"}


def test_guess_can_open(small_dump: SmallDump, tmp_path: object) -> None:
    backend = TdumpBackendEntrypoint()
    assert backend.guess_can_open(small_dump.path)
    assert not backend.guess_can_open(str(tmp_path))
    assert not backend.guess_can_open(object())
    # xarray picks the engine on its own for a local dump
    ds = xr.open_dataset(small_dump.path, mode="eval")
    assert ds.attrs["mode"] == "eval"


def test_memory_url_via_xarray(memory_dump: SmallDump) -> None:
    ds = xr.open_dataset(memory_dump.path, engine="tdump", mode="eval")
    np.testing.assert_array_equal(
        ds["relu.output_0"].sel(step=0).values, memory_dump.values[("eval", "relu.output_0", 0)]
    )


def test_modes_in_one_order_everywhere(small_dump: SmallDump) -> None:
    """train, eval, global: the accessor, open_dump and Trial agree, however nodes are listed."""
    import tdump
    from tdump.analyze import Trial

    assert small_dump.writer is not None
    # a scalar of no module sits on the mode's own node, which a breadth-first walk meets
    # before any module node of train or eval
    small_dump.writer.write_tensor(
        "global", 0, "scalars.accuracy", np.asarray(0.5), dims=(),
        attrs={"collection": "scalars", "kind": "scalar", "module": ""},
    )  # fmt: skip
    small_dump.writer.commit("global", 0, step=30, batch_size=0)
    want = ["train", "eval", "global"]
    assert Trial(small_dump.path).modes() == want
    for dt in (tdump.open_dump(small_dump.path), xr.open_datatree(small_dump.path, engine="tdump")):
        assert dt.tdump.modes == want
        assert dt.tdump.tensor("scalars.accuracy").values.tolist() == [0.5]
        assert dt.tdump.tensor("conv1.weight").coords["mode"].item() == "train"


def test_open_datatree_without_engine_in_a_fresh_process(small_dump: SmallDump) -> None:
    """xarray asks only backends with ``supports_groups`` for trees: the installed entry
    point must say so, or a local dump falls through to xarray's zarr engine."""
    import subprocess
    import sys

    code = (
        "import sys, xarray as xr; p = sys.argv[1]; "
        "print(list(xr.open_datatree(p).children), sorted(xr.open_groups(p, mode='eval')), "
        "xr.backends.plugins.guess_engine(p, must_support_groups=True))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, small_dump.path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['train', 'eval'] ['/', '/loss', '/relu'] tdump"
    assert TdumpBackendEntrypoint.supports_groups


def test_misspelt_modes_and_groups_are_config_errors(small_dump: SmallDump) -> None:
    dt = xr.open_datatree(small_dump.path, engine="tdump")
    for call in (
        lambda: dt.tdump.names("relu", mode="evl"),
        lambda: dt.tdump.tensor("conv1.weight", mode="evl"),
        lambda: dt.tdump.module("relu", mode="evl"),
        lambda: xr.open_dataset(small_dump.path, engine="tdump", mode="evl"),
        lambda: xr.open_datatree(small_dump.path, engine="tdump", mode="evl"),
    ):
        with pytest.raises(ConfigError, match=r"unknown mode 'evl'; .*did you mean 'eval'\?$"):
            call()
    # a real mode this (sub)tree lacks is missing data, not an empty answer
    with pytest.raises(MissingTensorError, match="no saved 'predict' steps; modes present"):
        dt.tdump.names(mode="predict")
    with pytest.raises(MissingTensorError, match="no saved 'eval' steps; modes present: train"):
        dt["train"].tdump.names(mode="eval")
    assert dt.tdump.names("relu", mode="eval") == ["relu.output_0"]
    # a group must start with its mode unless mode= is given
    with pytest.raises(
        ConfigError, match=r"group 'relu' does not start with a mode; .*'train/relu'"
    ):
        xr.open_dataset(small_dump.path, engine="tdump", group="relu")
    with pytest.raises(ConfigError, match="tensor name must be a str"):
        dt.tdump.tensor(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a path or URL"):
        xr.open_dataset(42, engine="tdump")  # type: ignore[arg-type]
