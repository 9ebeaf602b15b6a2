"""The background writer: back-pressure, and no hang when its thread dies."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
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


def _wide_record(step: int, names: int = 6) -> PendingRecord:
    rec = PendingRecord("train", step, batch_size=4)
    g = torch.Generator().manual_seed(step)
    for i in range(names):
        value = torch.relu(torch.randn(4, 8, 5, 5, generator=g))
        rec.add(f"layer{i}.relu_output_0", value, dims=("batch", "c", "h", "w"),
                attrs={"collection": "activations"})  # fmt: skip
    return rec


def test_writer_threads_write_every_tensor_of_a_record(tmp_path: Path) -> None:
    path = str(tmp_path / "w.zarr")
    w = BackgroundWriter(lambda: StoreWriter.create(path), threads=3, compression="auto")
    want = {}
    for step in range(4):
        rec = _wide_record(step)
        want[step] = {e.name: e.value.numpy().copy() for e in rec.entries.values()}
        w.submit(rec)
    w.flush()
    assert any(t.name.startswith("tdump-encode") for t in threading.enumerate())
    w.close()
    r = StoreReader(path)
    assert r.steps("train").tolist() == [0, 1, 2, 3]
    for step, tensors in want.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(r.array("train", name)[step], value)


def test_a_failed_write_on_a_writer_thread_is_raised_and_not_committed(tmp_path: Path) -> None:
    path = tmp_path / "w.zarr"
    w = BackgroundWriter(lambda: StoreWriter.create(str(path)), threads=3)
    w.submit(_wide_record(0))
    w.flush()
    # a folder where record 1's shard file of one tensor should be: opening it fails there
    shard = next(path.rglob("layer3.relu_output_0/c.0*"))
    shard.unlink()
    shard.mkdir()
    w.submit(_wide_record(1))
    with pytest.raises(IsADirectoryError):
        w.close()
    r = StoreReader(str(path))
    assert r.steps("train").tolist() == [0]  # record 1 was never committed
    np.testing.assert_array_equal(r.array("train", "layer0.relu_output_0")[0],
                                  _wide_record(0).entries["layer0.relu_output_0"].value.numpy())  # fmt: skip


def test_writer_threads_default_from_the_cpus() -> None:
    from tdump.capture import HookConfig, default_writer_threads
    from tdump.errors import ConfigError

    assert [default_writer_threads(n) for n in (1, 2, 4, 8, 12, 16, 128)] == [1, 1, 1, 2, 3, 4, 4]
    assert BackgroundWriter(lambda: StoreWriter.create("memory://t"))._threads >= 1
    with pytest.raises(ConfigError, match="writer_threads must be >= 0"):
        HookConfig(writer_threads=-1)
    with pytest.raises(ConfigError, match="writer_threads must be an integer, not '4'"):
        HookConfig.from_dict({"writer_threads": "4"})
    with pytest.raises(ConfigError, match="include_activations must be true or false"):
        HookConfig.from_dict({"include_activations": "yes"})


def test_usable_cpus_follow_a_cgroup_quota(tmp_path: Path) -> None:
    import os

    from tdump.capture._config import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(str(cpu_max)) == affinity
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two threads may run
    assert usable_cpus(str(cpu_max)) == min(2, affinity)
    cpu_max.write_text("garbage\n")
    assert usable_cpus(str(cpu_max)) == affinity
    assert usable_cpus(str(tmp_path / "absent")) == affinity


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
def test_reused_host_buffers_store_what_the_model_held(tmp_path: Path, device: str) -> None:
    from tdump import Hook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hook = Hook(str(tmp_path / "c.zarr"), include_regex=".*weight", save_interval=1, strict=True)
    hook.register_module(model)
    held: list[np.ndarray] = []
    for _ in range(4):
        held.append(model[0].weight.detach().cpu().numpy().copy())
        model(torch.randn(4, 8, device=device)).sum().backward()
        opt.step()  # changes the weights in place right after the (non-blocking) copies
        opt.zero_grad()
    hook.close()
    r = StoreReader(str(tmp_path / "c.zarr"))
    assert r.steps("train").tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(r.array("train", "0.weight")[:4], np.stack(held))
    free = [t for ts in hook.writer.buffers._free.values() for t in ts]
    assert free  # the records' buffers went back to the pool for the next saved step
    assert all(t.is_pinned() == (device == "cuda") for t in free)
