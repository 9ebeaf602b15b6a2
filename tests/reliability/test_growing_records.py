"""Records whose batch (or any other axis) grows after the first saved step.

A tensor array's chunk is one whole record, and a Zarr chunk shape is fixed, so a
larger value rebuilds the array (``tdump._arrays.regrow``). Every test writes real
records (the capture hook or :class:`StoreWriter`), keeps numpy copies of what it
wrote, and reads them back through tdump's readers and through plain zarr: each
record holds its values in its leading rows and the fill value in the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import tdump._format as fmt
from tdump._format import StoreReader, StoreWriter

ROOT = str(Path(__file__).resolve().parents[2])

#: Row shapes of tensor ``a``, one per record: the batch grows at records 1, 3 and 6
#: and shrinks at 2 and 5, the second axis grows at 2; ``None``: not saved at record 4.
SHAPES: list[tuple[int, int] | None] = [(4, 3), (8, 3), (3, 5), (16, 2), None, (6, 5), (20, 1)]


def _value(record: int, shape: tuple[int, ...]) -> np.ndarray:
    """What record ``record`` of tensor ``a`` holds (distinct per record and element)."""
    return np.arange(int(np.prod(shape)), dtype="f4").reshape(shape) + 1000 * record


def write_records(
    path: str, start: int = 0, stop: int | None = None, *, create: str = "append"
) -> None:
    """Write records ``start .. stop - 1`` of :data:`SHAPES` (and an int scalar ``n``) to ``path``."""
    w = StoreWriter.create(path, mode=create)
    for i in range(start, len(SHAPES) if stop is None else stop):
        shape = SHAPES[i]
        if shape is not None:
            w.write_tensor("train", i, "a", _value(i, shape), dims=("batch", "feature"))
        # 0 at record 0: a record equal to the fill value is still a saved record
        w.write_tensor("train", i, "n", np.array(i, "i4"), dims=())
        w.commit("train", i, step=10 * i, batch_size=shape[0] if shape else -1)


def _plain(path: str, name: str) -> zarr.Array:
    """Tensor ``name`` of mode train opened by plain zarr (no tdump code)."""
    store = StoreReader(path).root.store
    return zarr.open_array(store, path=f"rank0/train/tensors/{name}", mode="r")


def _expected(value: np.ndarray | None, row: tuple[int, ...], fill: Any) -> np.ndarray:
    out = np.full(row, fill, dtype=np.asarray(fill).dtype if value is None else value.dtype)
    if value is not None:
        out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def check_records(path: str, count: int) -> None:
    """Records ``0 .. count - 1`` are committed and hold exactly what was written."""
    r = StoreReader(path, snapshot=True)
    assert r.num_records("train") == count
    assert r.steps("train").tolist() == [10 * i for i in range(count)]
    a, n = _plain(path, "a"), _plain(path, "n")
    held = [i for i in range(count) if SHAPES[i] is not None]
    if held:
        row = tuple(max(SHAPES[i][d] for i in held) for d in range(2))  # type: ignore[index]
        # larger where an uncommitted record (a killed writer's) grew it already
        assert all(got >= want for got, want in zip(a.shape[1:], row, strict=True)), a.shape
        # one chunk (a shard's inner chunk) per record, whole rows: the fast paths apply
        assert tuple(a.chunks) == (1, *a.shape[1:])
    assert r.saved_records("train", "a").tolist() == held
    assert r.saved_records("train", "n").tolist() == list(range(count))
    assert sorted(r.record_sizes("train", "a")) == held
    for i in range(count):
        shape = SHAPES[i]
        want = _expected(None if shape is None else _value(i, shape), tuple(a.shape[1:]), np.nan)
        np.testing.assert_array_equal(r.read("train", "a", i), want, err_msg=f"record {i}")
        np.testing.assert_array_equal(a[i], want, err_msg=f"plain zarr, record {i}")
        assert int(r.read("train", "n", i)) == i == int(np.asarray(n[i]))


@pytest.fixture(params=["v2", "v1", "memory"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A store path: format 2 (shard files), format 1 (a file per record), or in memory."""
    if request.param == "v1":
        monkeypatch.setattr(fmt, "FORMAT_VERSION", 1)
    if request.param == "memory":
        return f"memory://grow-{uuid.uuid4().hex}/d.zarr"
    return str(tmp_path / "d.zarr")


def test_any_axis_grows_shrinks_and_grows_again(layout: str) -> None:
    write_records(layout, create="create")
    check_records(layout, len(SHAPES))


def test_appending_session_grows_again(layout: str) -> None:
    """A second writer continues a grown array, grows it again, and the first records survive."""
    write_records(layout, 0, 3, create="create")
    check_records(layout, 3)
    write_records(layout, 3)
    check_records(layout, len(SHAPES))


def test_reader_opened_before_growth_keeps_reading(tmp_path: Path) -> None:
    """An array opened before a growth (a lazy xarray, a ranking snapshot) still reads its records."""
    path = str(tmp_path / "d.zarr")
    w = StoreWriter.create(path)
    first = _value(0, (4, 3))
    w.write_tensor("train", 0, "a", first, dims=("batch", "feature"))
    w.commit("train", 0, step=0, batch_size=4)
    before = _plain(path, "a")
    snapshot = StoreReader(path, snapshot=True)
    snapshot.read("train", "a", 0)  # opens and keeps the array
    w.write_tensor("train", 1, "a", _value(1, (8, 3)), dims=("batch", "feature"))
    w.commit("train", 1, step=1, batch_size=8)
    np.testing.assert_array_equal(before[0], first)
    np.testing.assert_array_equal(snapshot.read("train", "a", 0), first)
    np.testing.assert_array_equal(_plain(path, "a")[0], _expected(first, (8, 3), np.nan))


def test_hook_batches_grow_and_shrink(tmp_path: Path) -> None:
    """The capture hook, a conv net, batches 4, 8, 3, 16, 8: Trial, open_dump, rank, plain zarr."""
    import torch
    from torch import nn

    import tdump
    from tdump.analyze import Trial
    from tdump.capture import Hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    loss_fn = nn.CrossEntropyLoss()
    seen: list[np.ndarray] = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().numpy().copy()))
    sizes = [4, 8, 3, 16, 8]
    path = str(tmp_path / "grow.zarr")
    with Hook(path, include_regex=r"^1\.output|^loss", save_interval=1) as hook:
        hook.register_module(model)
        hook.register_loss(loss_fn)
        for b in sizes:
            x, y = torch.randn(b, 1, 6, 6), torch.randint(0, 3, (b,))
            loss_fn(model(x), y).backward()
    assert [s.shape[0] for s in seen] == sizes

    trial = Trial(path)
    assert trial.steps(mode="train") == list(range(len(sizes)))
    name = "1.output_0"
    assert trial.tensor(name).shape("train") == (16, 4, 4, 4)
    plain = _plain(path, name)
    xr_values = tdump.open_dump(path)["train/1"]["output_0"]
    for step, (b, act) in enumerate(zip(sizes, seen, strict=True)):
        want = _expected(act, (16, 4, 4, 4), np.nan)
        value = trial.tensor(name).value(step, mode="train")
        np.testing.assert_array_equal(value[:b], act)  # Trial gives the batch_size rows
        for got in (xr_values.isel(step=step).values, plain[step]):
            np.testing.assert_array_equal(got, want, err_msg=f"step {step}")

    ranks = tdump.rank(path, criterion="apoz", progress=False)
    assert ranks.examples.unique().tolist() == [sum(sizes)]
    apoz = 1 - sum((a == 0).mean(axis=(2, 3)).sum(0) for a in seen) / sum(sizes)
    np.testing.assert_allclose(ranks.sort_values("channel").score.to_numpy(), apoz, rtol=1e-6)


#: Per store: fork a writer (no zarr call in this process before forking) that SIGKILLs
#: itself at ``point`` during the growth at record 2, and print how each ended.
_KILLER = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import tdump._arrays as arrays, tdump._chunks as chunks, tdump._format as fmt, tdump._shards as shards
from tests.reliability.test_growing_records import write_records

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point):
    state = {"growths": 0, "copies": 0}
    regrow, put, drop = arrays.regrow, arrays._put_metadata, arrays._drop_chunks
    def regrow_(*a, **k):
        state["growths"] += 1
        return regrow(*a, **k)
    def at_growth_2():
        return state["growths"] == 2
    def put_(*a, **k):
        if at_growth_2() and point == "before-switch":
            die()
        out = put(*a, **k)
        if at_growth_2() and point == "after-switch":
            die()
        return out
    def copying(write):
        def write_(self, *a, **k):
            out = write(self, *a, **k)
            # growth 2 copies into "." keys (growth 1 went from "." to "/")
            if at_growth_2() and point == "mid-copy" and self.arr.metadata.chunk_key_encoding.separator == ".":
                state["copies"] += 1
                if state["copies"] == 1:
                    die()  # record 0 copied, record 1 not yet
            return out
        return write_
    def drop_(*a, **k):
        drop(*a, **k)
        if at_growth_2() and point == "dropped":
            die()
    arrays.regrow, arrays._put_metadata, arrays._drop_chunks = regrow_, put_, drop_
    fmt.regrow = regrow_
    chunks.ChunkFiles.write = copying(chunks.ChunkFiles.write)
    shards.ShardFiles.write = copying(shards.ShardFiles.write)

for path, point, version in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        try:
            fmt.FORMAT_VERSION = int(version)
            arm(point)
            write_records(path)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps([path, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL]))
"""

_POINTS = ["dropped", "mid-copy", "before-switch", "after-switch"]


def test_writer_killed_during_growth(tmp_path: Path) -> None:
    """A writer SIGKILLed at each moment of a growth leaves a store with every committed
    record intact; the next writer removes the leftovers, continues and grows again."""
    runs = [(str(tmp_path / f"{p}-v2.zarr"), p, 2) for p in _POINTS]
    runs.append((str(tmp_path / "mid-copy-v1.zarr"), "mid-copy", 1))
    argv = [x for run in runs for x in (run[0], run[1], str(run[2]))]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, ROOT, *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    killed = dict(json.loads(line) for line in proc.stdout.splitlines())
    for path, point, _ in runs:
        assert killed[path], (point, "the writer was not killed at that point")
        # killed while writing record 2: records 0 and 1 are committed, one growth done
        check_records(path, 2)
        folder = Path(path, "rank0/train/tensors/a")
        live = json.loads((folder / "zarr.json").read_text())
        sep = live["chunk_key_encoding"]["configuration"]["separator"]
        StoreWriter.create(path)  # an appending writer removes what the growth left
        names = [p.name for p in folder.iterdir()]
        stale = ["c"] if sep == "." else [n for n in names if n.startswith("c.")]
        assert not set(stale) & set(names), (point, sep, names)
        write_records(path, 2)
        check_records(path, len(SHAPES))
