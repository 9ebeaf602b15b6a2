"""`tdump rank -o`: the output path is checked before ranking and written atomically."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tdump.analyze import read_ranks, write_ranks
from tdump.analyze._ranks_io import normalize_scores
from tests.reliability.conftest import one_line_error, tdump_cli, tree_digest


def test_output_is_a_directory(tiny_dump: str, tmp_path: Path, run_cli: Any) -> None:
    before = tree_digest(tiny_dump)
    line = one_line_error(run_cli("rank", tiny_dump, "-o", str(tmp_path), "-q"))
    assert "is a directory" in line and "ranks.parquet" in line
    assert os.listdir(tmp_path) == [] and tree_digest(tiny_dump) == before


def test_output_folder_missing(tiny_dump: str, tmp_path: Path, run_cli: Any) -> None:
    line = one_line_error(run_cli("rank", tiny_dump, "--out", str(tmp_path / "no/r.parquet")))
    assert "does not exist" in line
    assert not (tmp_path / "no").exists()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted at ``tmp_path/fs`` (root only; skipped elsewhere)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_keeps_old_ranks(
    tiny_dump: str, tmp_path: Path, small_fs: Path, run_cli: Any
) -> None:
    # a good ranks file, then fill the file system to the last block
    target = small_fs / "ranks.parquet"
    table = pd.DataFrame({"layer": "0", "channel": [0, 1], "score": [1.0, 2.0], "criterion": "l1",
                          "steps": 1, "examples": 0, "sources": "0.weight", "mode": "train"})  # fmt: skip
    write_ranks(normalize_scores(table), target)
    old = target.read_bytes()
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    line = one_line_error(tdump_cli("rank", tiny_dump, "-o", str(target), "-q"))
    assert "No space left on device" in line and "unchanged" in line
    assert target.read_bytes() == old
    assert sorted(os.listdir(small_fs)) == ["filler", "ranks.parquet"]  # no partial file left
    assert read_ranks(target).attrs["tdump"]["criterion"] == "l1"


def test_existing_file_replaced(tiny_dump: str, tmp_path: Path, run_cli: Any) -> None:
    """An earlier ranks file is replaced whole (another kind of file is refused: test_rank)."""
    target = tmp_path / "ranks.parquet"
    first = run_cli("rank", tiny_dump, "-o", str(target), "-q", "-c", "l1")
    assert first.code == 0, first.err
    assert read_ranks(target).attrs["tdump"]["criterion"] == "l1"
    res = run_cli("rank", tiny_dump, "-o", str(target), "-q", "-c", "apoz")
    assert res.code == 0, res.err
    assert read_ranks(target).attrs["tdump"]["criterion"] == "apoz"
    assert os.listdir(tmp_path) == ["ranks.parquet"]
