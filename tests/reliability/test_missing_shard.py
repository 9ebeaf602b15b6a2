"""A deleted shard file is damage, not records never saved (store format 2).

Zarr reads a shard file that is not there as the fill value, so before this a dump
whose shard was deleted by hand read as "no data". Readers now raise one-line
:class:`CorruptStoreError` naming the missing file where the store says records are
(docs/FORMAT.md, "Validation by readers"), while records a tensor genuinely does not
hold (a collection on its own schedule, a scalar that first appears later) and
stores from killed writers read as before. The dumps are recorded by the real hook;
``small_shards`` keeps 2 records per shard so that a few steps make several shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import tdump
from tdump._format import StoreReader
from tdump.analyze import Trial, rank
from tdump.analyze._info import summarize
from tdump.errors import CorruptStoreError
from tests.reliability.conftest import TINY_INCLUDE, copy_dump, one_line_error, tiny_net

ROOT = str(Path(__file__).resolve().parents[2])
ACT = "5.output_0"  # the ReLU after the second conv: read by the taylor ranking
TENSORS = "rank0/train/tensors"


def record_small_shards(path: str, steps: int = 7) -> str:
    """The tiny net, 2 records per shard; ``0.weight`` saved at steps 0 and 5 only,
    ``scalars.late`` from step 4 on, everything else at every step."""
    import torch
    from torch import nn

    import tdump._shards as shards
    from tdump.capture import Hook

    model = tiny_net()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    weights = {"weights": {"save_steps": [0, 5]}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "SHARD_RECORDS", 2)
        hook = Hook(
            path, include_regex=TINY_INCLUDE, save_interval=1, strict=True, collections=weights
        )
        hook.register_module(model)
        hook.register_loss(loss_fn)
        for step in range(steps):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 4, (4,), generator=g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if step >= 4:
                hook.save_scalar("late", float(step))
            opt.step()
        hook.close()
    return path


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return record_small_shards(str(tmp_path_factory.mktemp("shards") / "small.zarr"))


def _readers(path: str, name: str, module: str, local: str) -> dict[str, Callable[[], object]]:
    """Every library reader of tensor ``name`` (module node ``module``, variable ``local``)."""
    return {
        "Trial.value": lambda: Trial(path).tensor(name).value(1),
        "Trial.steps": lambda: Trial(path).tensor(name).steps(),
        "open_dump": lambda: tdump.open_dump(path)[f"train/{module}"][local].values,
        "xarray backend": lambda: xr.open_dataset(path, engine="tdump")[name].values,
        "StoreReader.read": lambda: StoreReader(path).read("train", name, 1),
        "StoreReader.saved_records": lambda: StoreReader(path).saved_records("train", name),
        "tdump.rank": lambda: rank(path, progress=False, scheduler="sync"),
        "ls (summarize)": lambda: summarize(path),
    }


def _assert_damaged(path: str, missing: Path, readers: dict[str, Callable[[], object]]) -> None:
    for what, read in readers.items():
        with pytest.raises(CorruptStoreError) as info:
            read()
        msg = str(info.value)
        assert "\n" not in msg, (what, msg)
        assert f"{missing} is missing" in msg or f"{missing} (records" in msg, (what, msg)
        assert "the dump is damaged" in msg and "re-record" in msg, (what, msg)


def _cli(run_cli: Any, dump: str, tmp_path: Path) -> list[str]:
    """The one error line of ``tdump rank`` and of ``tdump ls``."""
    out = tmp_path / "ranks.parquet"
    lines = [one_line_error(run_cli("rank", dump, "-o", str(out), "-q"))]
    assert not out.exists()
    return [*lines, one_line_error(run_cli("ls", dump))]


def test_deleted_only_shard_is_damage_in_every_reader(
    tiny_dump: str, tmp_path: Path, run_cli: Any
) -> None:
    dump = copy_dump(tiny_dump, tmp_path / "d.zarr")
    shard = Path(dump, TENSORS, ACT, "c.0.0.0.0.0")
    assert sorted(os.listdir(shard.parent)) == ["c.0.0.0.0.0", "zarr.json"]
    shard.unlink()
    _assert_damaged(dump, shard, _readers(dump, ACT, "5", "output_0"))
    for line in _cli(run_cli, dump, tmp_path):
        assert f"tensor '{ACT}' has no shard file for its 3 committed records" in line, line
        assert f"{shard} is missing" in line and str(shard.parent) in line, line
    # the other tensors still read
    assert Trial(dump).tensor("2.output_0").value(1).shape == (4, 8, 8, 8)


def test_intact_dump_and_records_not_saved_read_as_before(small_shards: str) -> None:
    tensors = Path(small_shards, TENSORS)
    # 0.weight is saved at records 0 and 5: shard 1 (records 2, 3) was never written;
    # scalars.late from record 4: shard 0 exists with no record, shard 1 never written
    assert sorted(p.name for p in (tensors / "0.weight").glob("c.*")) == [
        "c.0.0.0.0.0",
        "c.2.0.0.0.0",
    ]
    assert sorted(p.name for p in (tensors / "scalars.late").glob("c.*")) == ["c.0", "c.2", "c.3"]
    trial = Trial(small_shards)
    assert trial.tensor("0.weight").steps() == [0, 5]
    assert trial.tensor("scalars.late").steps() == [4, 5, 6]
    assert trial.tensor(ACT).steps() == list(range(7))
    weight = tdump.open_dump(small_shards)["train/0"]["weight"].values
    assert np.isnan(weight[[1, 2, 3, 4, 6]]).all() and np.isfinite(weight[[0, 5]]).all()
    late = xr.open_dataset(small_shards, engine="tdump")["scalars.late"].values
    assert np.isnan(late[:4]).all() and late[4:].tolist() == [4.0, 5.0, 6.0]
    assert np.isnan(StoreReader(small_shards).read("train", "0.weight", 2)).all()
    info = summarize(small_shards)
    assert {t["name"]: t["records"] for t in info["tensors"]}["0.weight"] == 2
    assert rank(small_shards, progress=False)["score"].notna().all()


def test_sizes_read_at_once_equal_sizes_read_one_by_one(
    small_shards: str, tiny_dump_v1: str
) -> None:
    """``tdump ls`` reads every tensor's shard indexes in one go: the same answer as
    one tensor at a time, for several shards with records not saved, and for format 1."""
    for dump in (small_shards, tiny_dump_v1):
        reader = StoreReader(dump)
        names = reader.tensor_names("train")
        many = reader.record_sizes_many("train", names)
        assert list(many) == names
        assert many == {n: StoreReader(dump).record_sizes("train", n) for n in names}
        assert all(v > 0 for sizes in many.values() for v in sizes.values())
    reader = StoreReader(small_shards)
    assert sorted(reader.record_sizes_many("train", ["0.weight"])["0.weight"]) == [0, 5]
    assert sorted(reader.record_sizes_many("train", [ACT], committed=3)[ACT]) == [0, 1, 2]


def test_deleted_middle_shard_is_damage(small_shards: str, tmp_path: Path, run_cli: Any) -> None:
    """A shard missing between two that hold the records either side of it."""
    dump = copy_dump(small_shards, tmp_path / "d.zarr")
    shard = Path(dump, TENSORS, ACT, "c.1.0.0.0.0")  # records 2 and 3
    shard.unlink()
    readers = _readers(dump, ACT, "5", "output_0")
    readers["Trial.value"] = lambda: Trial(dump).tensor(ACT).value(2)
    readers["StoreReader.read"] = lambda: StoreReader(dump).read("train", ACT, 2)
    _assert_damaged(dump, shard, readers)
    for line in _cli(run_cli, dump, tmp_path):
        assert f"is missing shard file {shard} (records 2 to 3)" in line, line
        assert "holds records 1 and 4 either side of it" in line, line


def test_deleted_first_shard_is_damage_when_the_writer_made_it_first(
    small_shards: str, tmp_path: Path, run_cli: Any
) -> None:
    """Shard 0 is created before zarr.json (``"shard0": true`` in the attributes): gone
    while later shards hold records, it is damage, also for a tensor that first
    appeared later (scalars.late, whose shard 0 holds no record)."""
    dump = copy_dump(small_shards, tmp_path / "d.zarr")
    for name, node, local in ((ACT, "5", "output_0"), ("scalars.late", "scalars", "late")):
        meta = json.loads(Path(dump, TENSORS, name, "zarr.json").read_text())
        assert meta["attributes"]["tdump"]["shard0"] is True
        shard = next(Path(dump, TENSORS, name).glob("c.0*"))
        shard.unlink()
        readers = _readers(dump, name, node, local)
        if name == "scalars.late":  # a mode-level variable; ranking never reads it
            readers["open_dump"] = lambda: tdump.open_dump(dump)["train"]["scalars.late"].values
            del readers["tdump.rank"]
        _assert_damaged(dump, shard, readers)
        assert f"is missing shard file {shard} (records 0 to 1)" in one_line_error(
            run_cli("ls", dump)
        )
        shard.write_bytes(Path(small_shards, TENSORS, name, shard.name).read_bytes())
    assert Trial(dump).tensor("scalars.late").steps() == [4, 5, 6]  # restored: reads again


def test_first_shard_missing_without_the_attribute_reads_as_not_saved(
    small_shards: str, tmp_path: Path
) -> None:
    """Arrays written before the attribute: a tensor that first appeared later may have
    no shard 0, so its absence stays "records not saved" there."""
    dump = copy_dump(small_shards, tmp_path / "d.zarr")
    folder = Path(dump, TENSORS, "scalars.late")
    meta = json.loads((folder / "zarr.json").read_text())
    del meta["attributes"]["tdump"]["shard0"]
    (folder / "zarr.json").write_text(json.dumps(meta))
    (folder / "c.0").unlink()
    assert Trial(dump).tensor("scalars.late").steps() == [4, 5, 6]
    late = xr.open_dataset(dump, engine="tdump")["scalars.late"].values
    assert np.isnan(late[:4]).all() and late[4:].tolist() == [4.0, 5.0, 6.0]


@pytest.fixture
def killed(tmp_path: Path) -> dict[str, str]:
    """``{point: store}``: recordings SIGKILLed at each point while writing record 4."""
    points = ["before-first-shard", "after-zarr-json", "new-shard"]
    paths = {p: str(tmp_path / f"{p}.zarr") for p in points}
    argv = [x for p in points for x in (paths[p], p)]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, ROOT, *argv], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    ended = dict(json.loads(line) for line in proc.stdout.splitlines())
    assert all(ended[paths[p]] for p in points), (ended, proc.stderr)
    return paths


#: Per store, fork a recording (torch imported once) that SIGKILLs itself at ``point``
#: while writing record 4: before the new scalar's shard 0 and zarr.json, right after
#: its zarr.json, or when the record opens a new shard (2) of a tensor.
_KILLER = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch, torch._dynamo, tdump.capture
import tdump._arrays as arrays, tdump._shards as shards
from tests.reliability.test_missing_shard import record_small_shards

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point):
    first, put, create = arrays.first_shard, arrays._put_metadata, shards.ShardFiles._create
    def first_(store, path, meta):
        if point == "before-first-shard" and path.endswith("scalars.late"):
            die()
        first(store, path, meta)
    def put_(store, path, meta, config=None):
        out = put(store, path, meta, config)
        if point == "after-zarr-json" and path.endswith("scalars.late"):
            die()
        return out
    def create_(self, path):
        if point == "new-shard" and os.path.basename(path).startswith("c.2."):
            die()
        return create(self, path)
    arrays.first_shard, arrays._put_metadata, shards.ShardFiles._create = first_, put_, create_

for path, point in zip(sys.argv[2::2], sys.argv[3::2]):
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        try:
            arm(point)
            record_small_shards(path)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps([path, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL]))
"""


def test_killed_writer_leaves_a_readable_store(killed: dict[str, str]) -> None:
    """Shard files a killed writer never got to create, for a record it never
    committed, are no damage: every reader reads the 4 committed records."""
    for point, path in killed.items():
        reader = StoreReader(path)
        assert reader.num_records("train") == 4, point
        late = Path(path, TENSORS, "scalars.late", "zarr.json")
        if point != "new-shard":  # there the new scalar may or may not be created yet
            assert late.exists() == (point == "after-zarr-json"), point
        trial = Trial(path)
        assert trial.tensor(ACT).steps() == [0, 1, 2, 3], point
        for name in trial.tensor_names():
            trial.tensor(name).steps()  # no shard is taken for missing
        if point == "after-zarr-json":  # listed, and holding no record yet
            assert trial.tensor("scalars.late").steps() == [], point
            values = xr.open_dataset(path, engine="tdump")["scalars.late"].values
            assert np.isnan(values).all(), point
        act = tdump.open_dump(path)["train/5"]["output_0"].values
        assert act.shape[0] == 4 and np.isfinite(act).all(), point
        assert summarize(path)["modes"]["train"]["records"] == 4, point
        assert rank(path, progress=False)["score"].notna().all(), point
