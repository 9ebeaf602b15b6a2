"""`tdump prune`: what it reads is never what it writes, a --dump that is not there is said,
option values are checked before any file, and the summary's notes say what went wrong.

Real files: SmallNet recorded at 3x8x8 by the real hook, ranks by the rank stage's own
writer naming that dump, pruned through the console-script entry point in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import tdump
from tdump.analyze import write_ranks as write_table
from tests.cli.inproc import run_main
from tests.surgery.helpers import random_scores, ranks_frame
from tests.surgery.nets import SmallNet, TimeConditioned

ARCH = ["--arch", "tests.surgery.nets.SmallNet"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmallNet's state_dict, a dump of it at 3x8x8, ranks naming the dump (relative)."""
    d = tmp_path_factory.mktemp("prune-paths")
    torch.manual_seed(0)
    model = SmallNet()
    dump = d / "d.zarr"
    with tdump.Hook(str(dump), include_regex=r".*\.weight", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    torch.save(model.state_dict(), d / "ckpt.pt")
    meta = {"criterion": "l1", "normalize": True, "dump": "d.zarr"}  # as `tdump rank d.zarr`
    write_table(ranks_frame(random_scores(model)), d / "ranks.parquet", meta=meta)
    return {"dir": d, "ckpt": d / "ckpt.pt", "ranks": d / "ranks.parquet", "dump": dump}


@pytest.fixture
def files(
    made: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """A fresh copy of ``made`` in ``tmp_path``, which is also the working folder."""
    for name in ("ckpt.pt", "ranks.parquet"):
        shutil.copy(made["dir"] / name, tmp_path / name)
    shutil.copytree(made["dump"], tmp_path / "d.zarr")
    monkeypatch.chdir(tmp_path)
    return {"dir": tmp_path, "ckpt": tmp_path / "ckpt.pt", "ranks": tmp_path / "ranks.parquet"}


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    return run_main(monkeypatch, capsys, "prune", *args)


def _one_line(code: int, err: str) -> str:
    assert code != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-o", "ckpt.pt"], "-o ckpt.pt is the checkpoint being pruned (CKPT)"),
        (["-o", "sub/../ckpt.pt"], "is the checkpoint being pruned (CKPT)"),
        (["-o", "link.pt"], "-o link.pt is the checkpoint being pruned (CKPT)"),
        (["-o", "ranks.parquet"], "-o ranks.parquet is the ranks file being read (RANKS)"),
        (["-o", "prev.pt", "--like", "prev.pt"], "is the previous round's checkpoint (--like)"),
        (["-o", "d.zarr"], "-o d.zarr is the dump d.zarr"),
        (["-o", "d.zarr/p.pt"], "is inside the dump d.zarr (recording it again deletes"),
        (["-o", "p.pt", "--save-plan", "ranks.parquet"], "--save-plan ranks.parquet is the ranks"),
        (["-o", "p.pt", "--save-plan", "p.pt"], "--save-plan p.pt is the -o path too"),
    ],
)
def test_output_never_replaces_an_input(
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    (files["dir"] / "sub").mkdir()
    os.symlink("ckpt.pt", files["dir"] / "link.pt")
    shutil.copy(files["ckpt"], files["dir"] / "prev.pt")
    before = _snapshot(files["dir"])
    code, _, err = _cli(
        monkeypatch, capsys, "ckpt.pt", "ranks.parquet", *ARCH, "--ratio", "0.3", *args
    )
    line = _one_line(code, err)
    assert needle in line and "choose another" in line, line
    assert _snapshot(files["dir"]) == before  # nothing replaced, nothing new


def test_default_output_named_like_ckpt(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round two's `tdump prune pruned.pt ...` without -o: refused, with a name to use;
    the same as a dry run (nothing is written) runs."""
    files["ckpt"].rename(files["dir"] / "pruned.pt")
    before = _snapshot(files["dir"])
    common = ["pruned.pt", "ranks.parquet", *ARCH, "--ratio", "0.3"]
    line = _one_line(*_cli(monkeypatch, capsys, *common)[::2])
    assert "-o pruned.pt (the default) is the checkpoint being pruned" in line
    assert line.endswith("e.g. -o pruned2.pt")
    assert _snapshot(files["dir"]) == before
    code, out, err = _cli(monkeypatch, capsys, *common, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] is None and _snapshot(files["dir"]) == before


@pytest.mark.parametrize(
    ("dump", "needle"),
    [
        (
            "nope.zarr",
            "--dump nope.zarr does not exist; give the dump the ranks came from, "
            "or leave --dump out to use the one the ranks name (d.zarr)",
        ),
        ("plain", "--dump plain is not a readable dump: plain is not a tdump store"),
        ("ranks.parquet", "--dump ranks.parquet is not a readable dump"),
    ],
)
def test_explicit_dump_must_be_a_dump(
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dump: str,
    needle: str,
) -> None:
    (files["dir"] / "plain").mkdir()
    args = ["ckpt.pt", "ranks.parquet", *ARCH, "--ratio", "0.3", "--dry-run", "--dump", dump]
    line = _one_line(*_cli(monkeypatch, capsys, *args)[::2])
    assert needle in line, line


def test_recorded_input_shape_and_a_moved_dump(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        str(files["ckpt"]),
        str(files["ranks"]),
        *ARCH,
        "--ratio",
        "0.3",
        "--dry-run",
        "--json",
    ]
    code, out, err = _cli(monkeypatch, capsys, *common)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["input_shape"] == [3, 8, 8] and summary["flops_before"] > 0
    assert not any("fallback" in n for n in summary["notes"])

    # from another folder: the ranks' relative dump is found beside the ranks file
    elsewhere = files["dir"] / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = _cli(monkeypatch, capsys, *common)
    assert code == 0 and json.loads(out)["input_shape"] == [3, 8, 8], err

    # the dump moved: the run goes on, at the fallback shape, and says how to give it
    (files["dir"] / "d.zarr").rename(files["dir"] / "moved.zarr")
    code, out, err = _cli(monkeypatch, capsys, *common)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["input_shape"] == [3, 224, 224]
    assert (
        "FLOPs use the fallback input shape 3x224x224: the dump the ranks name (d.zarr) is not "
        "there (moved or deleted?); give the dump with --dump DUMP or the shape with "
        "--input-shape C,H,W"
    ) in summary["notes"]
    code, out, err = _cli(monkeypatch, capsys, *common, "--dump", str(files["dir"] / "moved.zarr"))
    assert code == 0 and json.loads(out)["input_shape"] == [3, 8, 8], err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ratio", "1.5"], "ratio must be in [0, 1)"),
        (["--count", "-1"], "count must be a non-negative integer"),
        (["--count", "1", "--aggregate", "bogus"], "unknown aggregation 'bogus'"),
        (["--count", "1", "--input-shape", "3,0,8"], "--input-shape must look like"),
        (["--count", "1", "--input-shape", "1,x,28"], "--input-shape must look like"),
        (["--count", "1", "--input-shape", "3,,8"], "--input-shape must look like"),
        (["--count", "1", "--scope", "layers"], "scope must be 'global' or 'per-layer'"),
        (["--count", "1", "--ratio", "0.3"], "give only one of count (--count) and ratio"),
        (["--scope", "global"], "say how much to prune: a fraction of the channels (--ratio 0.2)"),
        (["--ratio", "0.3", "--min-channels", "0"], "min_channels must be >= 1"),
        (["--ratio", "0.3", "--max-ratio", "0"], "max_ratio must be in (0, 1]"),
        (["--ratio", "0.3", "--round-to", "0"], "round_to must be >= 1"),
        (["--ratio", "0.3", "--normalize", "bogus"], "unknown normalize 'bogus'"),
    ],
)
def test_option_values_come_before_files(
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    """No --arch for SmallNet's plain state_dict (an error of its own), a missing --like:
    the bad value is what is said."""
    line = _one_line(
        *_cli(monkeypatch, capsys, "ckpt.pt", "ranks.parquet", "--like", "gone.pt", *args)[::2]
    )
    assert needle in line, line


def test_bad_settings_read_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CKPT and RANKS that do not exist, and every reader replaced by a tripwire: a bad
    option value is the error, so nothing was opened before the Settings were checked."""
    import tdump.surgery as surgery

    opened: list[str] = []
    for name in ("read_ranks_table", "load", "prune", "plan"):
        monkeypatch.setattr(surgery, name, lambda *a, _n=name, **k: opened.append(_n))
    monkeypatch.chdir(tmp_path)
    line = _one_line(
        *_cli(monkeypatch, capsys, "gone.pt", "gone.parquet", "--ratio", "0.3", "--round-to", "0")[
            ::2
        ]
    )
    assert "round_to must be >= 1, got 0" in line and opened == []


@pytest.mark.parametrize(
    ("args", "said", "unsaid"),
    [
        (["gone.pt", "gone.parquet"], ["gone.pt", "gone.parquet", "--ratio"], []),
        (["gone.pt", "ranks.parquet", "--ratio", "0.3"], ["no checkpoint at gone.pt"], ["ranks"]),
        (["ckpt.pt", "gone.parquet"], ["no ranks file at gone.parquet", "--ratio"], ["ckpt"]),
    ],
)
def test_missing_inputs_and_a_missing_ratio_in_one_line(
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    said: list[str],
    unsaid: list[str],
) -> None:
    """A missing CKPT or RANKS is said with a missing --count/--ratio, so one retry fixes
    all; the folder is left as it was."""
    folder = files["dir"]
    before = _snapshot(folder)
    code, _, err = _cli(monkeypatch, capsys, *args)
    line = _one_line(code, err)
    assert all(word in line for word in said), line
    assert not any(word in line for word in unsaid), line
    assert _snapshot(folder) == before


def test_cli_settings_reach_prune_as_they_are(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Settings made from the options (before any file) is the one surgery.prune selects
    with: passed as ``settings=``, not rebuilt from the options, and the plan says them."""
    import tdump.surgery as surgery

    calls: list[dict[str, object]] = []
    prune = surgery.prune

    def spy(model: object, ranks: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return prune(model, ranks, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(surgery, "prune", spy)
    args = ["--ratio", "0.5", "--scope", "per-layer", "--round-to", "2", "--normalize", "rms"]
    code, _, err = _cli(
        monkeypatch, capsys, "ckpt.pt", "ranks.parquet", *ARCH, *args, "--save-plan", "p.json"
    )
    assert code == 0, err
    (kwargs,) = calls
    expected = surgery.Settings(ratio=0.5, scope="per-layer", round_to=2, normalize="rms")
    assert kwargs["settings"] == expected
    assert set(kwargs) == {"settings", "ignore", "criterion", "inplace", "input_shape"}
    saved = json.loads((files["dir"] / "p.json").read_text())["settings"]
    assert saved == {**dataclasses.asdict(expected), "max_ratio": None}


def test_summary_notes_and_total(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["ckpt.pt", "ranks.parquet", *ARCH, "--dry-run"]
    # a channel count the model does not take: said whole, with the shape that fits
    code, out, err = _cli(
        monkeypatch, capsys, *common, "--ratio", "0.3", "--json", "--input-shape", "1,8,8"
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["flops_before"] is None
    assert (
        "FLOPs not computed: the model's first conv (stem) expects 3 input channels, "
        "--input-shape gives 1; pass --input-shape 3,8,8"
    ) in summary["notes"]

    # removing nothing totals 0, not -0
    code, out, err = _cli(monkeypatch, capsys, *common, "--count", "0")
    assert code == 0, err
    total = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert total.split()[2] == "0" and "-0" not in total, total

    # an --ignore that matches nothing is said, with the close names; one that matches is not
    code, out, err = _cli(
        monkeypatch, capsys, *common, "--ratio", "0.3", "--json", "--ignore", "stme"
    )
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert (
        "--ignore 'stme' matches no module of the model, so it leaves nothing alone; "
        "did you mean stem?"
    ) in notes
    code, out, err = _cli(
        monkeypatch, capsys, *common, "--ratio", "0.3", "--json", "--ignore", "^a$"
    )
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert "ranks of a not used: ignore '^a$' leaves it alone" in notes
    assert not any("matches no module" in n for n in notes)


def test_flops_of_a_model_with_timesteps_use_the_recorded_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """forward(x, t), t int64: the dump records the second input's shape and dtype."""
    torch.manual_seed(0)
    model = TimeConditioned()
    with tdump.Hook(str(tmp_path / "d.zarr"), include_regex=r".*\.weight", strict=True) as hook:
        hook.register_module(model)
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 7])).sum().backward()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    meta = {"criterion": "l1", "normalize": True, "dump": "d.zarr"}
    write_table(ranks_frame(random_scores(model)), tmp_path / "ranks.parquet", meta=meta)
    monkeypatch.chdir(tmp_path)
    args = ["ckpt.pt", "ranks.parquet", "--arch", "tests.surgery.nets.TimeConditioned"]
    code, out, err = _cli(monkeypatch, capsys, *args, "--count", "2", "--dry-run", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["input_shape"] == [3, 8, 8]
    assert summary["more_inputs"] == [{"shape": [1], "dtype": "int64"}]
    # multiply-accumulates, by hand: conv a 3x3 over 8x8 positions, conv b 1x1 over 8x8
    assert summary["flops_before"] == 8 * 3 * 9 * 64 + 4 * 8 * 64
    code, out, err = _cli(monkeypatch, capsys, *args, "--count", "2", "--dry-run")
    assert code == 0 and "(input 3x8x8, and 1 int64)" in out, err
