"""The corrupt-store matrix: every damage gives one `error:` line, exit != 0, nothing
written, the dump unchanged, in `tdump ls`, `tdump rank`, `open_dump` and `Trial`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import tdump
from tdump.analyze import Trial
from tdump.errors import NotADumpError
from tests.reliability.conftest import copy_dump, one_line_error, tdump_cli, tree_digest
from tests.reliability.corrupt import CORRUPTIONS

#: Damage to tensor bytes only: `ls` reads no chunk, so it still lists the dump.
DATA_ONLY = {"garbage_chunk", "truncated_chunk", "empty_chunk"}
#: A 0-byte chunk under `rank`'s direct file reader is tdump/_chunks.py's size check (not here).
NOT_HERE = {("empty_chunk", "rank")}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_cli_one_line(damage: str, tiny_dump: str, tmp_path: Path, run_cli: Any) -> None:
    dump = copy_dump(tiny_dump, tmp_path / "d.zarr")
    CORRUPTIONS[damage](dump)
    before = tree_digest(dump)
    out = tmp_path / "ranks.parquet"
    if (damage, "rank") not in NOT_HERE:
        line = one_line_error(run_cli("rank", dump, "-o", str(out), "-q"))
        assert "is damaged" in line or "not a tdump store" in line, line
        assert not out.exists()
    res = run_cli("ls", dump)
    if damage in DATA_ONLY:
        assert res.code == 0 and "5.output_0" in res.out
    else:
        assert "is damaged" in one_line_error(res)
    assert tree_digest(dump) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]


@pytest.mark.parametrize("damage", [*sorted(DATA_ONLY - {"empty_chunk"}), "data_type", "shape"])
def test_library_readers(damage: str, tiny_dump: str, tmp_path: Path) -> None:
    dump = copy_dump(tiny_dump, tmp_path / "d.zarr")
    CORRUPTIONS[damage](dump)
    with pytest.raises(NotADumpError, match=r"is damaged: .*5\.output_0"):
        tdump.open_dump(dump)["train/5"]["output_0"].values  # noqa: B018 - lazy until read
    with pytest.raises(NotADumpError, match=r"is damaged: .*5\.output_0"):
        Trial(dump).tensor("5.output_0").value(1)


@pytest.mark.parametrize("damage", sorted(DATA_ONLY))
def test_format_1_chunk_files(damage: str, tiny_dump_v1: str, tmp_path: Path, run_cli: Any) -> None:
    """A format-1 dump (a file per record) damaged the same ways: the same one-line answers."""
    dump = copy_dump(tiny_dump_v1, tmp_path / "d.zarr")
    assert Path(dump, "rank0/train/tensors/5.output_0/c.1.0.0.0.0").exists()
    CORRUPTIONS[damage](dump)
    out = tmp_path / "ranks.parquet"
    if (damage, "rank") not in NOT_HERE:
        line = one_line_error(run_cli("rank", dump, "-o", str(out), "-q"))
        assert "is damaged" in line, line
    res = run_cli("ls", dump)
    assert res.code == 0 and "5.output_0" in res.out
    if damage != "empty_chunk":
        with pytest.raises(NotADumpError, match=r"is damaged: .*5\.output_0"):
            Trial(dump).tensor("5.output_0").value(1)


def test_console_script(tiny_dump: str, tmp_path: Path) -> None:
    """In a fresh interpreter: an error raised in a Dask worker thread, no stray tracebacks."""
    dump = copy_dump(tiny_dump, tmp_path / "d.zarr")
    CORRUPTIONS["garbage_chunk"](dump)
    out = tmp_path / "r.parquet"
    assert "does not decode" in one_line_error(tdump_cli("rank", dump, "-o", str(out), "-q"))
    assert not out.exists()


def test_half_created_nodes_are_not_damage(tiny_dump: str, tmp_path: Path, run_cli: Any) -> None:
    """A writer killed while creating a group or array leaves a folder with only a
    ``zarr.<hex>.partial``: no node yet, so readers list around it."""
    dump = copy_dump(tiny_dump, tmp_path / "d.zarr")
    half = Path(dump, "rank0/train/tensors/9.output_0")
    half.mkdir()
    (half / "zarr.0123abcd.partial").write_bytes(b"{")
    Path(dump, "rank1").mkdir()
    res = run_cli("ls", dump)
    assert res.code == 0 and "9.output_0" not in res.out and "ranks 0\n" in res.out, res.err
    listed = set(os.listdir(Path(dump, "rank0/train/tensors"))) - {"9.output_0", "zarr.json"}
    assert Trial(dump).tensor_names() == sorted(listed)
