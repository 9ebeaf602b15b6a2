"""`tdump ls` / `tdump info`: table, --json, and one-line errors (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SmallDump, make_bad_path

TDUMP = str(Path(sys.executable).parent / "tdump")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TDUMP, *args], capture_output=True, text=True, timeout=120, env=_env())


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def test_ls_json(small_dump: SmallDump) -> None:
    res = _run("ls", small_dump.path, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["schema_version"] == 1
    assert info["format"] == "tdump.store" and info["format_version"] == 2
    assert [r["rank"] for r in info["ranks"]] == [0]
    assert info["modes"]["train"]["steps"] == [0, 10, 20]
    assert info["modes"]["train"]["records"] == 3
    assert info["modes"]["train"]["examples"] == 10
    assert info["modes"]["eval"]["first_step"] == 0 and info["modes"]["eval"]["last_step"] == 5
    by = {(t["mode"], t["name"]): t for t in info["tensors"]}
    assert {n for m, n in by if m == "train"} == set(small_dump.names("train"))
    w = by[("train", "conv1.weight")]
    assert w["shape"] == [4, 1, 3, 3] and w["dtype"] == "float32"
    assert w["dims"] == ["out_channel", "in_channel", "ky", "kx"]
    assert w["collection"] == "weights" and w["module"] == "conv1"
    assert w["records"] == 3 and w["logical_bytes"] == 3 * 36 * 4
    assert w["stored_bytes"] > 0 and w["ratio"] == pytest.approx(
        w["logical_bytes"] / w["stored_bytes"], rel=1e-2
    )
    assert by[("train", "scalars.lr")]["records"] == 2
    assert by[("train", "relu.output_0")]["shape"] == [4, 4, 6, 6]
    assert info["collections"]["activations"] == ["relu.output_0", "relu.output_1"]
    tot = info["totals"]
    assert tot["stored_bytes"] == sum(t["stored_bytes"] for t in info["tensors"])
    assert tot["store_bytes"] >= tot["stored_bytes"]
    assert tot["tensors"] == len(small_dump.names("train"))


def test_ls_table_and_info_alias(small_dump: SmallDump) -> None:
    res = _run("ls", small_dump.path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for text in (
        "tdump.store v2",
        "train: 3 records",
        "steps 0, 10, 20",
        "conv1.weight",
        "4x1x3x3",
        "float32",
        "collections:",
        "stored",
        "ratio",
    ):
        assert text in out, text
    alias = _run("info", small_dump.path, "--mode", "eval", "-m", "relu")
    assert alias.returncode == 0, alias.stderr
    assert "relu.output_0" in alias.stdout and "conv1.weight" not in alias.stdout


def test_ls_file_url(small_dump: SmallDump) -> None:
    res = _run("ls", "file://" + small_dump.path, "--json", "--match", "bias")
    assert res.returncode == 0, res.stderr
    assert [t["name"] for t in json.loads(res.stdout)["tensors"]] == ["conv1.bias"]


def _assert_one_line_error(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:")
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("missing", ["no dump at"]),
        ("not_a_dump", ["not a tdump store"]),
        ("plain_zarr", ["did not write"]),
        ("newer", ["format version 99", "upgrade"]),
    ],
)
def test_ls_bad_paths(tmp_path: Path, kind: str, words: list[str]) -> None:
    path, _ = make_bad_path(str(tmp_path), kind)
    _assert_one_line_error(_run("ls", path), *words)


def test_ls_bad_regex_and_no_match(small_dump: SmallDump) -> None:
    _assert_one_line_error(_run("ls", small_dump.path, "--match", "relu("), "invalid regex")
    _assert_one_line_error(_run("ls", small_dump.path, "--match", "^nothing$"), "matches none")
    _assert_one_line_error(
        _run("ls", small_dump.path, "--mode", "predict"), "has no saved 'predict' steps"
    )


@pytest.mark.parametrize("columns", [80, 100])
def test_ls_fits_the_width(small_dump: SmallDump, columns: int) -> None:
    import os

    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    res = subprocess.run([TDUMP, "ls", small_dump.path], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= columns, res.stdout
    for name in small_dump.names("train"):
        assert name in res.stdout, name  # names are never cut
    assert any(ln.startswith("tensor") and "records" in ln and "stored" in ln for ln in lines)
    if columns == 80:
        assert "hidden to fit 80 columns; --json has all" in lines[-1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ls_says_the_storage_dtype(tmp_path: Path, dtype: str) -> None:
    """A lossy storage dtype shows as `STORED (TRAINING)`, bfloat16 too (kept in float32 arrays)."""
    import torch
    from torch import nn

    from tdump.capture import Hook

    out = str(tmp_path / "d.zarr")
    model = nn.Conv2d(3, 4, 3)
    with Hook(out, include_regex=r".*weight", save_interval=1, storage_dtype=dtype) as hook:
        hook.register_module(model)
        model(torch.randn(1, 3, 5, 5)).sum().backward()
    res = _run("ls", out)
    assert res.returncode == 0, res.stderr
    assert f"{dtype} (float32)" in res.stdout
    info = json.loads(_run("ls", out, "--json").stdout)
    assert {t["storage_dtype"] for t in info["tensors"]} == {dtype}
