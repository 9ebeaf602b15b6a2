"""The background writer: back-pressure, and no hang when its thread dies."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tdump._format import StoreReader, StoreWriter
from tdump.capture._writer import BackgroundWriter, PendingRecord


def _record(step: int) -> PendingRecord:
    rec = PendingRecord("train", step, batch_size=2)
    rec.add(
        "fc.weight", torch.full((2, 3), float(step)), dims=("out_feature", "in_feature"), attrs={}
    )
    return rec


def test_records_are_written_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "w.zarr")
    w = BackgroundWriter(lambda: StoreWriter.create(path), queue_size=1)
    for step in range(5):
        w.submit(_record(step))
    w.close()
    r = StoreReader(path)
    assert r.steps("train").tolist() == [0, 1, 2, 3, 4]
    assert r.array("train", "fc.weight")[3].tolist() == [[3.0] * 3] * 2


class _DyingWriter(BackgroundWriter):
    """A writer thread that stops after its first record (as an uncaught error would)."""

    def _run(self) -> None:
        _kind, item = self._queue.get()
        self._write(item)
        self.started.wait()  # the test fills the queue before the thread goes away

    started = threading.Event()


def test_dead_writer_thread_raises_instead_of_hanging(tmp_path: Path) -> None:
    path = str(tmp_path / "w.zarr")
    w = _DyingWriter(lambda: StoreWriter.create(path), queue_size=1)
    w.submit(_record(0))
    w.submit(_record(1))  # fills the queue
    w.started.set()
    with pytest.raises(RuntimeError, match="writer thread stopped"):
        for step in range(2, 6):  # would block forever on the full queue
            w.submit(_record(step))
    assert StoreReader(path).steps("train").tolist() == [0]  # what was written stays readable


def test_rank_joining_after_root_was_recreated(tmp_path: Path) -> None:
    """DDP ranks create the root together; a rank's late re-creation drops the root's attrs."""
    import zarr

    path = str(tmp_path / "ddp.zarr")
    StoreWriter.create(path, rank=0, world_size=2)
    zarr.open_group(path, mode="a").attrs.clear()  # what a racing rank's create leaves
    StoreWriter.create(path, rank=1, world_size=2)
    assert StoreReader(path).ranks() == [0, 1]
    foreign = str(tmp_path / "foreign.zarr")
    zarr.open_group(foreign, mode="w").create_group("images")
    with pytest.raises(ValueError, match="did not write"):
        StoreWriter.create(foreign)


def test_snapshot_reader_keeps_its_first_view_while_a_plain_reader_follows(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "w.zarr")
    w = BackgroundWriter(lambda: StoreWriter.create(path), queue_size=1)
    for step in range(2):
        w.submit(_record(step))
    w.flush()
    plain, snap = StoreReader(path), StoreReader(path, snapshot=True)
    assert plain.num_records("train") == snap.num_records("train") == 2
    first = snap.array("train", "fc.weight")
    for step in range(2, 5):
        w.submit(_record(step))
    w.close()
    assert plain.num_records("train") == 5
    assert snap.num_records("train") == 2  # counted once: one consistent view
    assert snap.array("train", "fc.weight") is first  # opened once
    assert snap.saved_records("train", "fc.weight").tolist() == [0, 1]
    assert plain.saved_records("train", "fc.weight").tolist() == [0, 1, 2, 3, 4]
    assert StoreReader(path, snapshot=True).num_records("train") == 5
