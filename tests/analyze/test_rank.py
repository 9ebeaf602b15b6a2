"""Ranking on real resnet18 dumps: numpy equality per criterion, schedulers, URLs, errors."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from tdump._dataflow import Dataflow
from tdump._format import StoreReader
from tdump.analyze import criteria, rank, rank_table, read_ranks, write_ranks
from tdump.errors import ConfigError, MissingTensorError, SelectionError
from tests.analyze.rank_helpers import magnitude, make_resnet18_dump, reference

CRITERIA = ["taylor", "taylor-signed", "l1", "bn-gamma", "apoz", "taylor-weight"]


@pytest.fixture(scope="session")
def dump(tmp_path_factory: pytest.TempPathFactory) -> str:
    """resnet18, batch 4, 3x32x32, 5 steps, saved every 2nd (steps 0, 2, 4); last batch of 3."""
    path = str(tmp_path_factory.mktemp("rank") / "resnet18.zarr")
    return make_resnet18_dump(path, steps=5, interval=2, batch=4, last_batch=3)


@pytest.fixture(scope="session")
def acts_only(tmp_path_factory: pytest.TempPathFactory) -> str:
    """ReLU outputs only: no gradients, no weights."""
    path = str(tmp_path_factory.mktemp("rank") / "acts.zarr")
    return make_resnet18_dump(path, steps=1, interval=1, grads=False, include=r".*relu")


@pytest.fixture(scope="session")
def client():  # type: ignore[no-untyped-def]
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": ":0"},  # not 8787: another worker's
    )
    cl = distributed.Client(cluster, set_as_default=False)
    yield cl
    cl.close()
    cluster.close()


@pytest.fixture(scope="session")
def taylor_threads(dump: str) -> pd.DataFrame:
    return rank(dump, progress=False)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_matches_plain_numpy(dump: str, criterion: str) -> None:
    reader = StoreReader(dump)
    df = rank(dump, criterion=criterion, progress=False, scheduler="threads", workers=2)
    assert list(df.columns)[:9] == [
        "layer",
        "channel",
        "score",
        "score_norm",
        "criterion",
        "steps",
        "examples",
        "sources",
        "mode",
    ]
    assert set(df["criterion"]) == {criterion}
    for layer, g in df.groupby("layer", sort=False):
        ref = reference(reader, criterion, g["sources"].iloc[0])
        atol = 0.0
        if criterion == "taylor-signed":  # signed float32 sums: error bound docs/ranking.md
            atol = 1e-6 * float(magnitude(reader, g["sources"].iloc[0]).max())
        np.testing.assert_allclose(
            g["score"].to_numpy(), ref, rtol=1e-5, atol=atol, err_msg=str(layer)
        )
        norm = np.linalg.norm(ref)
        np.testing.assert_allclose(
            g["score_norm"].to_numpy(), ref / norm, rtol=1e-5, atol=atol / norm, err_msg=str(layer)
        )
        assert g["channel"].tolist() == list(range(len(g)))
    per_step = criterion not in ("l1", "bn-gamma")
    assert set(df["steps"]) == ({3} if per_step else {1})
    uses_batch = criterion not in ("l1", "bn-gamma")
    assert set(df["examples"]) == ({4 + 4 + 3} if uses_batch else {0})
    if criterion == "apoz":
        assert ((df["score"] >= 0) & (df["score"] <= 1)).all()


def test_layers_and_sources(taylor_threads: pd.DataFrame, dump: str) -> None:
    df = taylor_threads
    layers = list(dict.fromkeys(df["layer"]))
    assert len(layers) == 17 and layers[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    src = df.groupby("layer")["sources"].first()
    assert src["layer1.0.conv1"] in (
        "layer1.0.relu.output_0,layer1.0.relu.output_0.grad",
        "layer1.0.relu.output_0.taylor",
    )
    assert src["layer1.0.conv2"].startswith("layer1.0.relu.output_1")
    assert df.groupby("layer").size()["layer4.1.conv2"] == 512
    l1 = rank(dump, criterion="l1", layers=r"downsample", progress=False)
    assert sorted(set(l1["layer"])) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]


def test_relu_to_conv_mapping(dump: str) -> None:
    meta = StoreReader(dump).meta()
    flow = Dataflow(meta["modules"], meta["calls"]["train"])
    assert flow.producing_conv("layer1.0.relu.output_0") == "layer1.0.conv1"
    assert flow.producing_conv("layer1.0.relu.output_1") == "layer1.0.conv2"
    assert flow.producing_conv("layer2.0.relu.output_1") == "layer2.0.conv2"
    assert flow.producing_conv("relu.output_0") == "conv1"
    assert flow.producing_conv("fc.output_0") is None
    assert flow.following_bn("layer1.0.conv2") == "layer1.0.bn2"
    assert flow.following_bn("layer2.0.downsample.0") == "layer2.0.downsample.1"
    assert flow.chain("layer1.0.relu.output_0") == [
        "layer1.0.relu",
        "layer1.0.bn1",
        "layer1.0.conv1",
    ]


def test_schedulers_agree(dump: str, taylor_threads: pd.DataFrame, client) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[int, int]] = []
    procs = rank(dump, scheduler="processes", workers=2, progress=lambda d, t: seen.append((d, t)))
    cluster = rank(dump, scheduler=client, progress=False)
    by_address = rank(dump, scheduler=client.scheduler.address, progress=False, split_every=2)
    sync = rank(dump, scheduler="sync", progress=False)
    for other in (procs, cluster, by_address, sync):
        pd.testing.assert_frame_equal(other, taylor_threads, rtol=1e-12)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    apoz_t = rank(dump, criterion="apoz", progress=False)
    apoz_c = rank(dump, criterion="apoz", scheduler=client, progress=False)
    pd.testing.assert_frame_equal(apoz_t, apoz_c, rtol=1e-12)


def test_rank_table_is_the_frame_without_pandas(dump: str, taylor_threads: pd.DataFrame) -> None:
    table = rank_table(dump, progress=False)
    frame = table.to_frame()
    pd.testing.assert_frame_equal(frame, taylor_threads, rtol=1e-12)
    meta, want = dict(frame.attrs["tdump"]), dict(taylor_threads.attrs["tdump"])
    assert meta.pop("created") and want.pop("created") and meta == want
    weakest = taylor_threads.nsmallest(10, "score_norm")
    assert table.weakest(10) == weakest.index.tolist()


def test_fsspec_urls(dump: str, taylor_threads: pd.DataFrame) -> None:
    fsspec = pytest.importorskip("fsspec")
    via_file = rank("file://" + os.path.abspath(dump), progress=False)
    pd.testing.assert_frame_equal(via_file, taylor_threads, rtol=1e-12)
    mem = fsspec.filesystem("memory")
    mem.put(dump, "/rank-test/d.zarr", recursive=True)
    via_mem = rank("memory://rank-test/d.zarr", progress=False)
    pd.testing.assert_frame_equal(via_mem, taylor_threads, rtol=1e-12)
    with pytest.raises(ConfigError, match="memory"):
        rank("memory://rank-test/d.zarr", scheduler="processes", progress=False)


def test_step_selection(dump: str) -> None:
    two = rank(dump, steps="0:3", progress=False)
    assert set(two["steps"]) == {2} and two.attrs["tdump"]["steps"] == [0, 2]
    assert set(rank(dump, steps=4, progress=False)["examples"]) == {3}
    assert set(rank(dump, steps=slice(2, None), progress=False)["steps"]) == {2}
    assert set(rank(dump, criterion="l1", steps=":1", progress=False)["steps"]) == {1}
    with pytest.raises(SelectionError, match=r"no saved 'train' steps in 100:2000") as exc:
        rank(dump, steps="100:2000", progress=False)
    assert "\n" not in str(exc.value) and "from 0 to 4" in str(exc.value)
    with pytest.raises(SelectionError, match="invalid step range"):
        rank(dump, steps="a:b", progress=False)
    with pytest.raises(MissingTensorError, match="no saved 'eval' steps"):
        rank(dump, mode="eval", progress=False)


def test_missing_gradients_and_tensors(acts_only: str) -> None:
    with pytest.raises(MissingTensorError) as exc:
        rank(acts_only, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "no gradients for 'relu.output_0'" in msg and "--include '.*relu'" in msg
    with pytest.raises(
        MissingTensorError, match=r"no conv or Linear weights .*--include '\.\*weight'"
    ):
        rank(acts_only, criterion="l1", progress=False)
    with pytest.raises(MissingTensorError, match="no BatchNorm weights"):
        rank(acts_only, criterion="bn-gamma", progress=False)
    with pytest.raises(MissingTensorError, match="no conv or Linear weights with gradients"):
        rank(acts_only, criterion="taylor-weight", progress=False)
    assert len(rank(acts_only, criterion="apoz", progress=False)) == 3904


def test_bad_options(dump: str) -> None:
    with pytest.raises(ConfigError, match="unknown criterion 'nope'"):
        rank(dump, criterion="nope", progress=False)
    with pytest.raises(SelectionError, match="matches no conv or hidden Linear layer"):
        rank(dump, layers="^nothing$", progress=False)
    with pytest.raises(SelectionError, match="invalid layers / --layers regex"):
        rank(dump, layers="(", progress=False)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        rank(dump, scheduler="gpu", progress=False)
    with pytest.raises(ConfigError, match="memory-limit"):
        rank(dump, memory_limit="1GB", progress=False)
    assert set(criteria()) >= set(CRITERIA)


def test_no_normalize_and_signed(dump: str, taylor_threads: pd.DataFrame) -> None:
    raw = rank(dump, normalize=False, progress=False)
    assert (raw["score_norm"] == raw["score"]).all()
    np.testing.assert_allclose(raw["score"], taylor_threads["score"], rtol=1e-12)
    signed = rank(dump, signed=True, progress=False)
    assert set(signed["criterion"]) == {"taylor-signed"} and (signed["score"] < 0).any()


def test_write_read_roundtrip(taylor_threads: pd.DataFrame, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ranks.parquet"
    write_ranks(taylor_threads, path)
    back = read_ranks(path)
    pd.testing.assert_frame_equal(back, taylor_threads, check_dtype=False)
    meta = back.attrs["tdump"]
    assert meta["format"] == "tdump.ranks" and meta["format_version"] == 1
    assert meta["criterion"] == "taylor" and meta["normalize"] is True
    assert meta["steps"] == [0, 4] and meta["dump"].endswith("resnet18.zarr")
    assert {"created", "tdump_version"} <= set(meta)
    assert back["channel"].dtype == np.int64 and back["score"].dtype == np.float64


@pytest.mark.parametrize("compression", ["zstd", "lz4", "zstd-plain", "none"])
def test_chunk_fast_path_matches_zarr(tmp_path, compression: str) -> None:  # type: ignore[no-untyped-def]
    from tdump._format import StoreWriter
    from tdump.analyze._tasks import _RecordReader
    from tdump.capture._writer import make_compressors

    rng = np.random.default_rng(3)
    w = StoreWriter.create(str(tmp_path / "d.zarr"))
    rows = [rng.standard_normal((4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
    for i, value in enumerate(rows):
        w.write_tensor("train", i, "a.output_0", value, compressors=make_compressors(compression))
        w.commit("train", i, step=i, batch_size=4)
    arr = StoreReader(str(tmp_path / "d.zarr")).array("train", "a.output_0")
    reader = _RecordReader(arr)
    assert reader.files is not None  # the direct path, not zarr's
    first = reader.read(0, scratch=True)
    np.testing.assert_array_equal(first, rows[0])
    np.testing.assert_array_equal(reader.read(1, 2, scratch=True), rows[1][:2])
    # scratch buffers are reused: the earlier result now holds record 1
    np.testing.assert_array_equal(first, rows[1])
    fresh = reader.read(2)
    np.testing.assert_array_equal(fresh, rows[2])
    np.testing.assert_array_equal(reader.read(0, scratch=True), rows[0])
    np.testing.assert_array_equal(fresh, rows[2])  # a non-scratch read is its own array
    missing = reader.read(5, scratch=True)  # never written: the fill value
    assert missing.shape == (4, 3, 5, 5) and np.isnan(missing).all()


def test_local_rank_loads_neither_distributed_nor_pandas_up_front(dump: str) -> None:
    """A fresh process: ``import tdump.analyze`` leaves pandas for later, and a threads
    rank never imports dask.distributed (0.2-0.3 s each of a cold ``tdump rank``)."""
    import subprocess
    import sys

    code = (
        "import sys, tdump.analyze as ta\n"
        "early = sorted(m for m in ('pandas', 'distributed', 'xarray') if m in sys.modules)\n"
        f"df = ta.rank({dump!r}, progress=False)\n"
        "print(early, 'distributed' in sys.modules, type(df).__name__, len(df))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    expected = len(rank(dump, progress=False))
    assert proc.stdout.split() == ["[]", "False", "DataFrame", str(expected)]


def test_taylor_term_recorded_at_source_ranks_like_full_tensors(
    tmp_path, dump: str, taylor_threads: pd.DataFrame
) -> None:  # type: ignore[no-untyped-def]
    """The loop's default capture (``reduction="taylor"``) gives the same Taylor ranks as
    the full activations and gradients of the same run (torch float32 vs float64 sums)."""
    path = make_resnet18_dump(
        str(tmp_path / "t.zarr"), steps=5, interval=2, batch=4, last_batch=3, reduction="taylor"
    )
    assert not [
        n
        for n in StoreReader(path).tensor_names("train")
        if "relu.output_" in n and not n.endswith(".taylor")
    ]
    for signed in (False, True):
        full = rank(dump, progress=False, signed=True) if signed else taylor_threads
        got = rank(path, progress=False, signed=signed)
        assert list(got["layer"]) == list(full["layer"])
        assert got["sources"].str.endswith(".taylor").all()
        # float32 sums at the source: relative error ~1e-4, more where signed terms cancel
        scale = float(full["score"].abs().max())
        np.testing.assert_allclose(got["score"], full["score"], rtol=2e-4, atol=1e-5 * scale)
        assert (got["score"].abs() > 0).all()
        assert (got["steps"] == full["steps"]).all() and (got["examples"] == full["examples"]).all()


def test_progress_on_a_pipe_writes_nothing(dump: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With stderr piped, ``rank(progress=True)`` and ``tdump rank`` leave no blank line
    (an empty rich bar); on a terminal (rich's TTY_COMPATIBLE=1) the bar is still drawn."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    code = f"import tdump\ntdump.rank({dump!r}, progress=True)\n"
    tdump_cli = str(Path(sys.executable).parent / "tdump")
    out = str(tmp_path / "r.parquet")
    for argv in ([sys.executable, "-c", code], [tdump_cli, "rank", dump, "-o", out]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "ranking" not in proc.stderr and "" not in proc.stderr.splitlines(), proc.stderr
    drawn = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TTY_COMPATIBLE": "1"},
    )
    assert drawn.returncode == 0 and "ranking" in drawn.stderr, drawn.stderr
