"""open_dump: the DataTree of lazy Dask arrays, on local paths and fsspec URLs."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

import tdump
from tdump.errors import DumpNotFoundError, FormatVersionError, MissingTensorError, NotADumpError
from tests.conftest import SmallDump, append_train, make_bad_path, write_small_dump


class _CountTasks(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.tasks = 0

    def _start(self, dsk: object) -> None:
        self.tasks += 1


def test_tree_layout_dims_and_coords(small_dump: SmallDump) -> None:
    dt = tdump.open_dump(small_dump.path)
    assert isinstance(dt, xr.DataTree)
    assert list(dt.children) == ["train", "eval"]
    assert list(dt["train"].children) == ["conv1", "relu", "loss"]  # the model's module order
    assert dt.attrs["format_version"] == 2
    assert dt.attrs["modules"]["conv1"]["config"]["out_channels"] == 4
    train = dt["train"]
    assert train.coords["step"].values.tolist() == [0, 10, 20]
    assert train.coords["batch_size"].values.tolist() == [4, 4, 2]
    assert train.coords["record"].values.tolist() == [0, 1, 2]
    assert train.coords["mode"].item() == "train"
    assert np.issubdtype(train.coords["time"].dtype, np.datetime64)
    w = dt["train/conv1"]["weight"]
    assert w.dims == ("step", "out_channel", "in_channel", "ky", "kx")
    assert w.attrs["tensor"] == "conv1.weight" and w.attrs["collection"] == "weights"
    # module nodes carry (or inherit) the coordinates
    assert w.coords["step"].values.tolist() == [0, 10, 20]
    assert w.coords["batch_size"].values.tolist() == [4, 4, 2]
    # relu's two calls have 4 and 8 channels: the clashing dims get their size appended
    relu = dt["train/relu"]
    assert relu["output_0"].dims == ("step", "batch", "channel_4", "y_6", "x_6")
    assert relu["output_1"].dims == ("step", "batch", "channel_8", "y_3", "x_3")
    assert relu["output_0.grad"].dims == relu["output_0"].dims
    # scalars (no module) sit on the mode node
    assert train["scalars.lr"].dims == ("step",)
    assert dt["eval/relu"]["output_0"].dims == ("step", "batch", "channel", "y", "x")


def test_values_equal_what_was_written(small_dump: SmallDump) -> None:
    dt = tdump.open_dump(small_dump.path)
    for (mode, name, step), value in small_dump.values.items():
        arr = dt.tdump.tensor(name, mode=mode).sel(step=step).values
        if value.ndim and arr.shape[0] != value.shape[0]:  # partial batch: padded rows are NaN
            assert np.isnan(arr[value.shape[0] :]).all(), name
            arr = arr[: value.shape[0]]
        np.testing.assert_array_equal(arr, value, err_msg=f"{mode} {name} {step}")


def test_lazy_dask_nothing_computed_on_open(small_dump: SmallDump) -> None:
    counter = _CountTasks()
    with counter:
        dt = tdump.open_dump(small_dump.path)
        for node in dt.subtree:
            for var in node.dataset.data_vars.values():
                assert isinstance(var.data, da.Array)
                assert var.data.chunks[0] == (1,) * var.sizes["step"]
    assert counter.tasks == 0
    assert dask.is_dask_collection(dt["train/relu"]["output_0"].data)


def test_not_saved_records_and_padding_read_as_nan(small_dump: SmallDump) -> None:
    train = tdump.open_dump(small_dump.path)["train"]
    lr = train["scalars.lr"].values
    assert lr[0] == pytest.approx(0.1) and np.isnan(lr[1]) and lr[2] == pytest.approx(0.1 / 3)
    # integer tensors: zeros are data, missing records and padded rows are NaN
    epoch = train["scalars.epoch"].values
    np.testing.assert_array_equal(epoch, [0.0, 0.0, 0.0])
    labels = train["loss"]["input_0.1"].values
    np.testing.assert_array_equal(labels[0], [0, 1, 2, 0])
    np.testing.assert_array_equal(labels[2, :2], [0, 1])
    assert np.isnan(labels[2, 2:]).all()
    out = train["relu"]["output_0"].sel(step=20)
    assert int(out.isnull().sum()) == 2 * 4 * 6 * 6
    # the batch_size coordinate selects the real rows
    rows = out.isel(batch=slice(0, int(out.coords["batch_size"])))
    assert not bool(rows.isnull().any())


def test_mode_argument_returns_that_mode(small_dump: SmallDump) -> None:
    dt = tdump.open_dump(small_dump.path, mode="eval")
    assert set(dt.children) == {"relu", "loss"}
    assert dt.coords["step"].values.tolist() == [0, 5]
    assert dt.attrs["format"] == "tdump.store"
    with pytest.raises(
        MissingTensorError, match=r"has no saved 'predict' steps; modes present: train, eval$"
    ):
        tdump.open_dump(small_dump.path, mode="predict")


def test_store_being_written_is_readable(tmp_path: object) -> None:
    dump = write_small_dump(str(tmp_path) + "/live.zarr", train_steps=(0, 10))
    first = tdump.open_dump(dump.path, mode="train")
    assert first.coords["step"].values.tolist() == [0, 10]
    append_train(dump, 20)
    append_train(dump, 30)
    # an object opened before keeps its view; reopening sees the new records
    assert first["conv1"]["weight"].shape[0] == 2
    again = tdump.open_dump(dump.path, mode="train")
    assert again.coords["step"].values.tolist() == [0, 10, 20, 30]
    np.testing.assert_array_equal(
        again["conv1"]["weight"].sel(step=30).values, dump.values[("train", "conv1.weight", 30)]
    )


def test_memory_url(memory_dump: SmallDump) -> None:
    dt = tdump.open_dump(memory_dump.path)
    np.testing.assert_array_equal(
        dt["train/conv1"]["bias"].sel(step=10).values,
        memory_dump.values[("train", "conv1.bias", 10)],
    )


def test_file_url(small_dump: SmallDump) -> None:
    dt = tdump.open_dump("file://" + small_dump.path)
    np.testing.assert_array_equal(
        dt["eval/relu"]["output_0"].sel(step=5).values,
        small_dump.values[("eval", "relu.output_0", 5)],
    )


def test_accessor_on_tree(small_dump: SmallDump) -> None:
    dt = tdump.open_dump(small_dump.path)
    acc = dt.tdump
    assert acc.modes == ["train", "eval"]
    assert acc.names("^relu") == ["relu.output_0", "relu.output_0.grad", "relu.output_1"]
    assert acc.names("^relu", mode="eval") == ["relu.output_0"]
    assert acc.modules["relu"]["type"].endswith("ReLU")
    assert "conv1.weight" in acc.collections["weights"]
    assert acc.module("conv1")["weight"].attrs["tensor"] == "conv1.weight"
    assert dt["train"].tdump.names("scalars") == ["scalars.epoch", "scalars.lr"]
    assert acc.tensor("relu.output_0", mode="eval").sizes["step"] == 2
    with pytest.raises(MissingTensorError, match=r"did you mean 'conv1\.weight'"):
        acc.tensor("conv1.wieght")
    with pytest.raises(MissingTensorError, match="no module"):
        acc.module("conv9")


@pytest.mark.parametrize("kind", ["missing", "not_a_dump", "plain_zarr", "newer"])
def test_open_errors(tmp_path: object, kind: str) -> None:
    path, exc = make_bad_path(str(tmp_path), kind)
    with pytest.raises(exc) as info:
        tdump.open_dump(path)
    assert "\n" not in str(info.value)
    assert issubclass(exc, (DumpNotFoundError, NotADumpError, FormatVersionError))


def test_store_without_records_yet(tmp_path: object) -> None:
    from tdump._format import StoreWriter
    from tdump.analyze import Trial
    from tdump.analyze._info import summarize

    path = f"{tmp_path}/empty.zarr"
    w = StoreWriter.create(path)
    w.write_tensor("train", 0, "fc.bias", np.zeros(2, "f4"), dims=("channel",))  # not committed
    assert list(tdump.open_dump(path).children) == []
    assert Trial(path).modes() == [] and Trial(path).steps() == []
    info = summarize(path)
    assert info["modes"] == {} and info["tensors"] == []
    w.commit("train", 0, step=7, batch_size=1)
    # no "module" attribute: the tensor sits on the mode node under its full name
    assert tdump.open_dump(path)["train"]["fc.bias"].sel(step=7).values.tolist() == [0.0, 0.0]


def test_arrays_opens_many_at_once_as_array_does(small_dump: SmallDump, tmp_path: Path) -> None:
    from tdump._format import StoreReader

    names = StoreReader(small_dump.path).tensor_names("train")
    snap = StoreReader(small_dump.path, snapshot=True)
    got = snap.arrays("train", names)
    assert list(got) == names
    for name in names:
        one = StoreReader(small_dump.path).array("train", name)
        assert got[name].path == one.path and got[name].shape == one.shape
        assert got[name].metadata.to_dict().keys() == one.metadata.to_dict().keys()
        assert dict(got[name].attrs) == dict(one.attrs)
        np.testing.assert_array_equal(got[name][:], one[:])
        assert snap.array("train", name) is got[name]  # a snapshot keeps what it opened
    with pytest.raises(MissingTensorError, match=r"^no tensor 'conv9.weight' in mode 'train'"):
        snap.arrays("train", [names[0], "conv9.weight"])
    with pytest.raises(MissingTensorError, match="has no data for rank 3"):
        StoreReader(small_dump.path).arrays("train", names, rank=3)
    Path(small_dump.path, got["conv1.weight"].path, "zarr.json").write_text("{")
    with pytest.raises(
        NotADumpError, match=r"rank0/train/tensors/conv1.weight/zarr.json cannot be read"
    ):
        StoreReader(small_dump.path).arrays("train", names)


def test_dask_names_follow_the_records(tmp_path: Path) -> None:
    # names are computed without pickling each zarr array: still the same for the same
    # data, and new for new records or a dump written again at the same path
    dump = write_small_dump(str(tmp_path / "live.zarr"), train_steps=(0, 10))

    def names() -> dict[str, str]:
        ds = xr.open_dataset(dump.path, engine="tdump", mode="train")
        return {k: v.data.name for k, v in ds.data_vars.items()}

    first = names()
    assert names() == first
    append_train(dump, 20)
    grown = names()
    assert all(grown[k] != first[k] for k in first)
    shutil.rmtree(dump.path)
    again = write_small_dump(dump.path, train_steps=(0, 10, 20), seed=1)
    assert again.writer is not None
    ds = xr.open_dataset(dump.path, engine="tdump", mode="train")
    renamed = {k: v.data.name for k, v in ds.data_vars.items()}
    assert all(renamed[k] != grown[k] for k in grown)
    np.testing.assert_array_equal(
        ds["conv1.weight"].sel(step=20).values, again.values[("train", "conv1.weight", 20)]
    )
