"""`tdump rank` as a subprocess: output, ranks file, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tdump.analyze import read_ranks
from tests.analyze.rank_helpers import make_resnet18_dump, record_mlp


def _tdump(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from tdump.cli.app import main; main()", *args]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("cli-rank") / "d.zarr")
    return make_resnet18_dump(path, steps=3, interval=1, batch=2)


def test_rank_counts_hidden_linear_features_apart(tmp_path: Path) -> None:
    dump = tmp_path / "mlp.zarr"
    record_mlp(dump)
    proc = _tdump("rank", str(dump), "-o", str(tmp_path / "r.parquet"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    # fc1 on (batch, 8) and tok on (batch, 36 tokens, 8), channels-last
    assert "ranked 8 filters in 1 conv layer and 18 features of 2 Linear layers by taylor" in (
        proc.stdout
    )
    assert read_ranks(tmp_path / "r.parquet").attrs["tdump"]["linear_layers"] == ["fc1", "tok"]
    only = _tdump("rank", str(dump), "-o", str(tmp_path / "t.parquet"), "--layers", "^tok$")
    assert "ranked 6 features of 1 Linear layer by taylor" in only.stdout, only.stderr
    # the listed rows are named for what they are: six Linear features, not "10 filters"
    assert "6 weakest features:" in only.stdout and "filters" not in only.stdout


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_rank_writes_file_and_summary(dump: str, tmp_path: Path) -> None:
    out = tmp_path / "ranks.parquet"
    proc = _tdump("rank", dump, "-o", str(out), "--steps", "1:", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "ranked 3904 filters in 17 conv layers by taylor" in proc.stdout
    assert "10 weakest filters" in proc.stdout and f"ranks written to {out}" in proc.stdout
    df = read_ranks(out)
    assert set(df["steps"]) == {2} and df.attrs["tdump"]["steps"] == [1, 2]
    weakest = df.nsmallest(10, "score_norm")  # pandas, independently of the command's numpy
    shown = [line.split() for line in proc.stdout.splitlines()[2:12]]
    assert [(w[0], int(w[2])) for w in shown] == list(
        zip(weakest["layer"], weakest["channel"].astype(int), strict=True)
    )


def test_rank_never_imports_pandas(dump: str, tmp_path: Path) -> None:
    """pandas costs 0.35 s to import (0.7 s from a cold page cache), all of it start-up."""
    out = tmp_path / "ranks.parquet"
    code = (
        "import atexit, sys; atexit.register(lambda: print('pandas:', 'pandas' in sys.modules)); "
        "from tdump.cli.app import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "rank", dump, "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "pandas: False"
    assert len(read_ranks(out)) == 3904


def test_rank_json_options(dump: str, tmp_path: Path) -> None:
    out = tmp_path / "l1.parquet"
    # a Dask dashboard already open at its default port: the local cluster does not
    # fight for it (no "Port 8787 is already in use" warning in the output)
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 8787))
        busy.listen()
    except OSError:
        pass  # in use already, as it should be for this test
    with busy:
        proc = _tdump(
            "rank", dump, "-o", str(out), "--criterion", "l1", "--layers", r"^layer1\.",
            "--no-normalize", "--scheduler", "processes", "--workers", "1",
            "--memory-limit", "700MB", "--json",
        )  # fmt: skip
    assert proc.returncode == 0 and "8787" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ranks"] == str(out) and summary["criterion"] == "l1"
    assert summary["layers"] == 4 and summary["filters"] == 256 and len(summary["weakest"]) == 10
    df = read_ranks(out)
    assert (df["score"] == df["score_norm"]).all() and df.attrs["tdump"]["normalize"] is False


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--steps", "100:2000"), "no saved 'train' steps in 100:2000"),
        (("--criterion", "bogus"), "unknown criterion 'bogus'"),
        (("--criterion", "bogus"), "under the entry-point group 'tdump.criteria'"),
        (("--layers", "^zzz"), "matches no conv or hidden Linear layer"),
        (("--scheduler", "processes", "--workers", "0"), "--workers must be at least 1"),
        (("--scheduler", "processes", "--memory-limit", "100MB"), "too small"),
    ],
)
def test_rank_errors(dump: str, tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    line = _one_line_error(_tdump("rank", dump, "-o", str(tmp_path / "x.parquet"), *args))
    assert needle in line
    assert not (tmp_path / "x.parquet").exists()


def test_rank_missing_gradients_and_dump(tmp_path: Path) -> None:
    acts = make_resnet18_dump(str(tmp_path / "a.zarr"), steps=1, interval=1, grads=False)
    line = _one_line_error(_tdump("rank", acts, "-o", str(tmp_path / "r.parquet")))
    assert "no gradients for 'relu.output_0'" in line and "--include '.*relu'" in line
    line = _one_line_error(
        _tdump("rank", acts, "-c", "taylor-weight", "-o", str(tmp_path / "r.parquet"))
    )
    assert "no gradient for 'conv1.weight'" in line
    line = _one_line_error(_tdump("rank", str(tmp_path / "nope.zarr")))
    assert "no dump at" in line


def test_rank_layer_filter_skips_downsample_with_a_true_note(dump: str, tmp_path: Path) -> None:
    """The docs' `--layers '^layer[34]'` on a ResNet: downsample convs have no activation
    of their own, but the residual + adds their channels to the blocks' conv2, which are
    scored: the note says the surgery prunes them together, and asks to record nothing."""
    out = tmp_path / "r.parquet"
    proc = _tdump("rank", dump, "--layers", "^layer[34]", "--output", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "downsample" in ln]
    assert notes == [
        "note: no taylor scores for 2 conv layers (layer3.0.downsample.0, "
        "layer4.0.downsample.0): their outputs are added to other layers' (a residual +) "
        "before any activation module; tdump prune prunes them with the scored layers whose "
        "channels they share (layer3.0.conv2, layer3.1.conv2, layer4.0.conv2 and 1 more), "
        "so they need no score of their own"
    ], proc.stderr
    df = read_ranks(out)
    assert df["layer"].nunique() == 8 and not df["layer"].str.contains("downsample").any()
    assert set(df.attrs["tdump"]["skipped"]) == {"layer3.0.downsample.0", "layer4.0.downsample.0"}


def test_rank_downsample_alone_still_says_what_to_record(dump: str, tmp_path: Path) -> None:
    """With the conv2 they are added to out of `--layers`, nothing scores the downsample
    convs' channels, so the note names what would (the recorded selection, plus this);
    so does a dump written before capture recorded the sums (no ``sum_of``)."""
    proc = _tdump("rank", dump, "--layers", "downsample|^layer4", "-o", str(tmp_path / "a.pq"))
    assert proc.returncode == 0, proc.stderr
    assert "(layer4.0.downsample.0): their outputs are added" in proc.stderr, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "layer2.0.downsample.0" in ln)
    assert "layer4.0" not in line and "tdump record --include '" in line, line
    assert r"|(?:^|\.)downsample\.1\.output_0'" in line and "residual +" not in line, line

    old = tmp_path / "old.zarr"
    shutil.copytree(dump, old)
    meta_file = old / "rank0" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    calls = doc["attributes"]["tdump"]["calls"]["train"]
    assert sum(bool(c.pop("sum_of", None)) for c in calls) == 8  # two per ResNet stage
    meta_file.write_text(json.dumps(doc))
    proc = _tdump("rank", str(old), "--layers", "^layer4", "-o", str(tmp_path / "b.pq"))
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "layer4.0.downsample.0" in ln)
    assert "tdump record --include '" in line and "residual +" not in line, line


def test_rank_out_with_another_suffix_says_it_is_parquet(dump: str, tmp_path: Path) -> None:
    out = tmp_path / "ranks.csv"
    proc = _tdump("rank", dump, "-o", str(out), "--quiet", "--layers", "^layer1")
    assert proc.returncode == 0, proc.stderr
    assert f"note: {out} holds Parquet (docs/FORMAT.md §2), whatever its suffix" in proc.stderr
    assert out.read_bytes()[:4] == b"PAR1" and len(read_ranks(out)) == 4 * 64
    plain = _tdump(
        "rank", dump, "-o", str(tmp_path / "r.parquet"), "--quiet", "--layers", "^layer1"
    )
    assert plain.returncode == 0 and "holds Parquet" not in plain.stderr


def test_rank_ignored_workers_is_a_note(dump: str, tmp_path: Path) -> None:
    """`--scheduler sync --workers 4`: one note line, as for other ignored options."""
    out = str(tmp_path / "r.parquet")
    proc = _tdump("rank", dump, "-o", out, "-q", "--scheduler", "sync", "--workers", "4")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "--workers" in ln]
    assert notes == [
        "note: --workers 4 ignored: the sync scheduler runs one task at a time "
        "(use threads or processes)"
    ]
    plain = _tdump("rank", dump, "-o", out, "-q", "--workers", "2")
    assert plain.returncode == 0 and "--workers" not in plain.stderr


def test_rank_output_never_replaces_another_file(
    dump: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint (or any file that is not a ranks file) given as -o stays as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from tests.cli.inproc import run_main

    ckpt, text, plain = tmp_path / "ckpt.pt", tmp_path / "notes.txt", tmp_path / "plain.parquet"
    torch.save({"w": torch.ones(2)}, ckpt)
    text.write_text("keep me")
    pq.write_table(pa.table({"a": [1]}), plain)
    for path, what in (
        (ckpt, "a torch checkpoint"),
        (text, "not Parquet"),
        (plain, "Parquet without tdump's ranks metadata"),
    ):
        before = path.read_bytes()
        code, _, err = run_main(monkeypatch, capsys, "rank", dump, "-o", str(path), "-q")
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {path} exists and is not a ranks file ({what}); ")
        assert "choose another -o (e.g. " in err
        assert path.read_bytes() == before


def test_rank_output_in_the_dump_is_refused(
    dump: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o DUMP` and `-o DUMP/ranks.parquet` suggest a file beside the dump, not in it
    (`tdump record --overwrite` deletes the dump's folder)."""
    from tests.cli.inproc import run_main

    beside = os.path.join(os.path.dirname(dump), "d.ranks.parquet")
    listing = sorted(os.listdir(dump))
    for out, where in (
        (dump, "is the dump being ranked"),
        (os.path.join(dump, "ranks.parquet"), f"is inside the dump {dump}"),
    ):
        code, _, err = run_main(monkeypatch, capsys, "rank", dump, "-o", out, "-q")
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {out} {where}; write the ranks beside it, e.g. -o {beside}")
    assert sorted(os.listdir(dump)) == listing
