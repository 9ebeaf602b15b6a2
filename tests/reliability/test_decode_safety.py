"""Damaged chunks and non-finite data never give silent wrong ranks (issue 7).

A chunk file that does not decode to exactly one record (empty, truncated, another
record's bytes, garbage) is a one-line :class:`CorruptStoreError` naming the tensor and
record, never the previous record's decoded buffer. A record whose tensors hold NaN
or Inf is left out of its layer's scores with a warning naming the tensor and step
(``keep_nan=True`` / ``--keep-nan`` keeps it, giving NaN scores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tdump._chunks import chunk_files
from tdump._format import StoreReader
from tdump._shards import ShardFiles
from tdump.analyze import rank
from tdump.capture import Hook
from tdump.errors import CorruptStoreError, NonFiniteWarning

ACT = "1.output_0"  # the ReLU after the first conv: ranks conv "0"
GRAD = ACT + ".grad"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )


def _record(path: Path, compression: str, steps: int = 3) -> str:
    model = _net()
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = Hook(str(path), include_regex=r"^\d\.output", save_interval=1, compression=compression)
    hook.register_module(model)
    hook.register_loss(loss_fn)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    hook.close()
    return str(path)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("decode")
    return {c: _record(base / f"{c}.zarr", c) for c in ("zstd", "lz4", "none")}


@pytest.fixture
def copy(dumps: dict[str, str], tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(compression: str) -> str:
        dst = tmp_path / f"{compression}.zarr"
        shutil.copytree(dumps[compression], dst)
        return str(dst)

    return make


def _files(path: str, name: str):  # type: ignore[no-untyped-def]
    files = chunk_files(StoreReader(path).array("train", name))
    assert files is not None
    return files


def _put_raw(files, index: int, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Make record ``index``'s stored bytes ``data`` (format 1: its file; 2: its shard entry)."""
    if isinstance(files, ShardFiles):
        shard = Path(files.path(index))
        end = shard.stat().st_size
        with open(shard, "r+b") as fh:
            fh.seek(end)
            fh.write(data)
            fh.seek(16 * (index % files.per))
            fh.write(np.array([end, len(data)], "<u8").tobytes())
    else:
        Path(files.path(index)).write_bytes(data)


def _drop(files, index: int) -> None:  # type: ignore[no-untyped-def]
    """Delete record ``index`` (a record not saved)."""
    if isinstance(files, ShardFiles):
        with open(files.path(index), "r+b") as fh:
            fh.seek(16 * (index % files.per))
            fh.write(b"\xff" * 16)
    else:
        Path(files.path(index)).unlink()


def _taylor(path: str, steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy Taylor score of conv "0" over the given saved steps, and its scale.

    The scale, per channel the same mean of ``|a * g|``, bounds the float32 sums' error
    (docs/ranking.md).
    """
    r = StoreReader(path)
    rec = r.records("train")
    a_arr, g_arr = r.array("train", ACT), r.array("train", GRAD)
    terms, scales = [], []
    for i, step in enumerate(rec["step"].tolist()):
        if step in steps:
            a = np.asarray(a_arr[i], dtype=np.float64)
            g = np.asarray(g_arr[i], dtype=np.float64)
            terms.append(np.abs((a * g).mean(axis=(2, 3))))
            scales.append(np.abs(a * g).mean(axis=(2, 3)))
    return np.concatenate(terms).mean(axis=0), np.concatenate(scales).mean(axis=0)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_empty_chunk_is_an_error(copy, compression: str) -> None:  # type: ignore[no-untyped-def]
    path = copy(compression)
    _put_raw(_files(path, ACT), 1, b"")
    with pytest.raises(
        CorruptStoreError,
        match=rf"'{ACT}', record 1 \(step 1\) does not decode: .*(is empty|holds 0 bytes)",
    ):
        rank(path, progress=False, scheduler="sync")


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_short_or_garbage_chunk_is_an_error(copy, compression: str) -> None:  # type: ignore[no-untyped-def]
    path = copy(compression)
    files = _files(path, ACT)
    # a valid encoding of fewer values: decoded into a reused buffer it would leave the
    # rest of record 0's values in place
    short = files.row_shape[0] - 1
    sub = chunk_files(StoreReader(path).array("train", ACT))
    assert sub is not None
    value = np.asarray(StoreReader(path).array("train", ACT)[1])[:short]
    enc = sub.codec.encode(np.ascontiguousarray(value)) if sub.codec else value.tobytes()
    _put_raw(files, 1, bytes(enc))
    with pytest.raises(CorruptStoreError, match=rf"'{ACT}', record 1 \(step 1\)"):
        rank(path, progress=False, scheduler="sync")
    _put_raw(files, 2, os.urandom(len(bytes(enc)) + 7))
    _drop(files, 1)  # a deleted chunk is a record not saved: step 1 drops out
    with pytest.raises(CorruptStoreError, match=rf"'{ACT}', record 2 \(step 2\)"):
        rank(path, progress=False, scheduler="sync")


def test_cli_corrupt_chunk_one_line(copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = copy("zstd")
    _put_raw(_files(path, GRAD), 0, b"")
    out = tmp_path / "ranks.parquet"
    cmd = [sys.executable, "-c", "from tdump.cli.app import main; main()", "rank", path]
    proc = subprocess.run([*cmd, "-o", str(out), "-q"], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and f"'{GRAD}', record 0 (step 0)" in lines[0]
    assert not out.exists()


def _poison(path: str, record: int, value: float) -> None:
    files = _files(path, ACT)
    a = np.array(files.read(record))
    a[0, 0, 0, 0] = value
    files.write(record, a)


def test_nan_record_left_out_with_a_warning(copy) -> None:  # type: ignore[no-untyped-def]
    path = copy("zstd")
    clean = rank(path, progress=False)
    _poison(path, 1, np.nan)
    with pytest.warns(NonFiniteWarning, match=rf"{ACT}.* 1 NaN/Inf values at step 1; layer '0'"):
        df = rank(path, progress=False)
    conv0 = df[df.layer == "0"]
    assert np.isfinite(df["score"]).all()
    want, scale = _taylor(path, [0, 2])
    np.testing.assert_allclose(conv0["score"], want, rtol=1e-6, atol=1e-6 * scale.max())
    assert conv0["steps"].iloc[0] == 2 and conv0["examples"].iloc[0] == 8
    # the other layer is untouched
    other = df[df.layer == "2"]["score"].to_numpy()
    np.testing.assert_allclose(other, clean[clean.layer == "2"]["score"], rtol=1e-12)

    with pytest.warns(NonFiniteWarning, match="scores are NaN"):
        kept = rank(path, progress=False, keep_nan=True)
    kept0 = kept[kept.layer == "0"]["score"].to_numpy()
    assert np.isnan(kept0[0]) and np.isfinite(kept0[1:]).all()  # the poisoned channel
    assert np.isfinite(kept[kept.layer == "2"]["score"]).all()


def test_layer_with_no_finite_record_is_dropped_and_cli_warns(copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = copy("lz4")
    for i in range(3):
        _poison(path, i, np.inf if i else np.nan)
    with pytest.warns(NonFiniteWarning, match="at steps 0, 1, 2"):
        df = rank(path, progress=False)
    assert set(df.layer) == {"2"}
    out = tmp_path / "r.parquet"
    cmd = [sys.executable, "-c", "from tdump.cli.app import main; main()", "rank", path, "-q"]
    proc = subprocess.run(
        [*cmd, "-o", str(out), "--keep-nan"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and ACT in warn[0] and "steps 0, 1, 2" in warn[0], proc.stderr
    assert "Traceback" not in proc.stderr
