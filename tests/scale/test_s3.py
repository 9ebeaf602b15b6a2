"""tdump against a real S3 HTTP endpoint (moto's server on 127.0.0.1).

The reference is the same script with the same seed recorded to local disk
(``tiny_local``): what lands in the bucket, what the readers see and the ranks must
all equal the local run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tdump
from tdump._format import StoreReader
from tdump.analyze import read_ranks
from tdump.analyze._info import summarize

from .conftest import (
    ROOT,
    S3,
    SCRIPTS,
    TDUMP,
    TINY_RECORD,
    LocalRun,
    ok,
    run,
    same_ranks,
    stop,
)

PACED = str(Path(__file__).parent / "scripts" / "paced_writer.py")


@pytest.fixture(scope="module")
def tiny_s3(s3: S3, request: pytest.FixtureRequest) -> str:
    """train_tiny.py recorded straight into the bucket by `tdump record`.

    The local reference run is recorded meanwhile (two processes, two cores).
    """
    url = s3.url("run.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [TDUMP, "record", "-o", url, *TINY_RECORD]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        request.getfixturevalue("tiny_local")
        _, err = proc.communicate(timeout=180)
    finally:
        stop([proc])
    assert proc.returncode == 0, err.decode()
    assert f"to {url}" in err.decode()
    return url


def _variables(dt: Any) -> dict[str, np.ndarray]:
    return {
        f"{node.path}/{name}": var.values
        for node in dt.subtree
        for name, var in node.dataset.data_vars.items()
    }


def _same_dump(got: str, want: str, **options: Any) -> None:
    """Every tensor of every record equal, read through open_dump (xarray, Dask)."""
    a = _variables(tdump.open_dump(got, **options))
    b = _variables(tdump.open_dump(want))
    assert a.keys() == b.keys() and len(a) >= 4
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_record_to_s3_holds_what_a_local_record_holds(tiny_s3: str, tiny_local: LocalRun) -> None:
    _same_dump(tiny_s3, tiny_local.path)
    assert StoreReader(tiny_s3).steps("train").tolist() == [0, 1, 2]


def test_ls_lists_the_s3_dump(tiny_s3: str, tiny_local: LocalRun) -> None:
    got = json.loads(ok(run([TDUMP, "ls", tiny_s3, "--json"])).stdout)
    want = summarize(tiny_local.path)  # what `tdump ls --json` prints
    assert got["path"] == tiny_s3
    assert got["modes"] == want["modes"]
    keep = ("name", "mode", "shape", "dtype", "records", "logical_bytes")
    assert [{k: t[k] for k in keep} for t in got["tensors"]] == [
        {k: t[k] for k in keep} for t in want["tensors"]
    ]
    assert all(t["stored_bytes"] > 0 for t in got["tensors"])


def test_rank_with_threads_reads_and_writes_s3(s3: S3, tiny_s3: str, tiny_local: LocalRun) -> None:
    out = s3.url("ranks.parquet")
    proc = ok(run([TDUMP, "rank", tiny_s3, "-q", "-o", out]))
    assert f"ranks written to {out}" in proc.stdout
    same_ranks(read_ranks(out), tiny_local.ranks)


def test_rank_on_a_local_cluster_reads_s3_from_its_workers(
    tiny_s3: str, tiny_local: LocalRun
) -> None:
    from distributed import Client, LocalCluster

    from tdump.analyze import _tasks

    def opened() -> list[str]:  # runs on each worker: the stores its tasks opened
        from tdump.analyze import _tasks

        return sorted({key[0] for key in _tasks._ARRAYS})

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},  # not 8787: another worker's
            silence_logs=40,
        ) as cluster,
        Client(cluster) as client,
    ):
        df = tdump.rank(tiny_s3, scheduler=client, progress=False)
        on_workers = client.run(opened)
    same_ranks(df, tiny_local.ranks)
    assert len(on_workers) == 2
    assert {p for paths in on_workers.values() for p in paths} == {tiny_s3}
    assert (tiny_s3, "{}") not in {key[:2] for key in _tasks._ARRAYS}  # not read here


def test_two_ddp_processes_write_one_s3_dump(s3: S3, tmp_path: Path) -> None:
    url = s3.url("ddp.zarr")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    script, init = str(SCRIPTS / "train_ddp.py"), str(tmp_path / "init")
    args = ["-n", "1", "-i", r"^1\.|^0\.weight", script]
    procs = [
        subprocess.Popen(
            [TDUMP, "record", "-o", url, *args, str(r), "2", init],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
    finally:
        stop(procs)
    r = StoreReader(url)
    assert r.ranks() == [0, 1]
    for rank in (0, 1):
        assert r.steps("train", rank).tolist() == [0, 1, 2]
        assert r.meta(rank)["world_size"] == 2
    # each rank trained on its own batches; DDP kept the weights in step
    a0, a1 = (r.array("train", "1.output_0", k)[0] for k in (0, 1))
    assert not np.allclose(a0, a1)
    np.testing.assert_array_equal(
        r.array("train", "0.weight", 0)[2], r.array("train", "0.weight", 1)[2]
    )
    # both writers' records rank the same from the bucket as from a local copy of it
    import s3fs

    local = str(tmp_path / "copy.zarr")
    s3fs.S3FileSystem(**s3.storage_options).get(url.removeprefix("s3://"), local, recursive=True)
    got = tdump.rank(url, progress=False)
    # every filter scored from both writers: 3 steps x 2 ranks x batch 2
    assert len(got) == 4 and (got["examples"] == 12).all()
    same_ranks(got, tdump.rank(local, progress=False))


def test_read_while_a_run_writes(s3: S3, tmp_path: Path) -> None:
    url, acks, steps = s3.url("live.zarr"), tmp_path / "acks", 4
    acks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, PACED, url, str(acks), str(steps)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        trial = None
        for k in range(steps - 1):  # record k is committed, k+1 not before our ack
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    trial = tdump.Trial(url) if trial is None else trial
                    trial.refresh()
                    if len(trial.steps("train")) > k:
                        break
                except (FileNotFoundError, LookupError):
                    pass  # the store or its train group is not there yet
                assert time.monotonic() < deadline, f"record {k} never became visible"
                time.sleep(0.1)
            assert trial.steps("train") == list(range(k + 1))  # nothing ahead of the writer
            w = trial.tensor("0.weight").values("train")
            assert sorted(w) == list(range(k + 1)) and all(
                v.shape == (4, 3, 3, 3) for v in w.values()
            )
            if k:  # SGD moved the weights between records
                assert not np.array_equal(w[k], w[k - 1])
            (acks / str(k)).touch()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "done" in out, err
    finally:
        stop([proc])
    assert trial is not None
    trial.refresh()
    assert trial.steps("train") == list(range(steps))


def test_open_dump_and_trial_with_storage_options(
    s3: S3, tiny_s3: str, tiny_local: LocalRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storage_options alone reach the bucket: the variables point at a closed port."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing there
    so = s3.storage_options
    _same_dump(tiny_s3, tiny_local.path, storage_options=so)
    got, want = tdump.Trial(tiny_s3, storage_options=so), tdump.Trial(tiny_local.path)
    assert got.steps() == want.steps() and got.tensor_names() == want.tensor_names()
    name = "relu.output_1.grad"
    for step in want.steps("train"):
        np.testing.assert_array_equal(got.tensor(name).value(step), want.tensor(name).value(step))
    same_ranks(tdump.rank(tiny_s3, storage_options=so, progress=False), tiny_local.ranks)
