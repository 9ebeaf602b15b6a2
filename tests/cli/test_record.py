"""`tdump record` on bad input: one-line errors, non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TDUMP = str(Path(sys.executable).parent / "tdump")
SCRIPT = str(ROOT / "tests" / "capture" / "scripts" / "train_tiny.py")


def _record(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [TDUMP, "record", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing_script.py"], "no training script at missing_script.py"),
        (["--include", "(", SCRIPT], "invalid include_regex"),
        (["--include", "zzz_nothing", SCRIPT, "--", "--steps", "1"], "matches no tensor"),
        (
            ["--config", "/no/such/config.yaml", SCRIPT],
            "config file /no/such/config.yaml not found",
        ),
        (["--config", '{"save_interval": 0}', SCRIPT], "save_interval must be a positive integer"),
        (["--config", '{"bogus": 1}', SCRIPT], "unknown hook setting(s) bogus"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args: list[str], needle: str) -> None:
    proc = _record("--out", str(tmp_path / "d.zarr"), *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def _unwritable() -> str | None:
    """A folder this process cannot create files in (root ignores modes: /sys refuses all)."""
    import tempfile

    for folder in ("/sys", "/proc"):
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(probe)
    return None


def test_bad_out_is_refused_before_training(tmp_path) -> None:
    """Under a regular file, unwritable, an existing dump without --append/--overwrite."""
    from tdump._format import StoreWriter

    (tmp_path / "file").write_text("x")
    dump = str(tmp_path / "old.zarr")
    StoreWriter.create(dump).commit("train", 0, step=0)
    before = sorted(p.name for p in Path(dump).rglob("*"))
    marker = tmp_path / "ran"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    cases = [
        (str(tmp_path / "file" / "d.zarr"), [], "is a file, not a folder"),
        (dump, [], "already holds a dump (1 train record(s) of rank 0); pass --append"),
        (dump, ["--append", "--overwrite"], "--append and --overwrite exclude each other"),
    ]
    ro = _unwritable()
    if ro is not None:
        cases.append((os.path.join(ro, "d.zarr"), [], "is not writable"))
    for out, flags, needle in cases:
        proc = _record("--out", out, *flags, str(script))
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not marker.exists()  # the script never ran
    assert sorted(p.name for p in Path(dump).rglob("*")) == before


def test_bad_script_with_overwrite_keeps_the_existing_dump(tmp_path: Path) -> None:
    """The script is checked before --overwrite deletes anything at --out."""
    import torch
    from torch import nn

    from tdump.analyze import Trial
    from tdump.capture import Hook

    dump = str(tmp_path / "d.zarr")
    model = nn.Linear(3, 2)
    with Hook(dump, include_regex="weight", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
    before = sorted(str(p.relative_to(dump)) for p in Path(dump).rglob("*"))
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    cases = [
        (str(ckpt), f"{ckpt} is not a Python script but a zip archive"),
        (str(tmp_path / "missing.py"), "no training script at"),
    ]
    for script, needle in cases:
        proc = _record("--overwrite", "--out", dump, script)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
        assert sorted(str(p.relative_to(dump)) for p in Path(dump).rglob("*")) == before
    trial = Trial(dump)
    assert trial.steps(mode="train") == [0, 1]
    assert trial.tensor("weight").steps(mode="train") == [0, 1]


def test_out_that_is_not_a_dump(tmp_path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    proc = _record("--out", str(tmp_path / "busy"), SCRIPT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "not a tdump store" in proc.stderr


def test_help_lists_the_options() -> None:
    proc = _record("--help")
    assert proc.returncode == 0
    for opt in ("--out", "--include", "--interval", "--config", "--append", "--overwrite"):
        assert opt in proc.stdout
    assert "Usage: tdump record [OPTIONS] (SCRIPT | -m MODULE) [-- ARGS...]" in proc.stdout
    assert "<list[str]>" not in proc.stdout and "{" not in proc.stdout
    assert "-c," not in proc.stdout  # -c is rank's --criterion; record takes --config only


def test_script_crash_shows_its_traceback_and_keeps_the_records(tmp_path: Path) -> None:
    """A script that raises: its own traceback (no tdump/typer frames), the records
    committed so far are kept and summarised, exit status 1 as with `python script`."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import torch\nfrom torch import nn\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for step in range(6):\n"
        "    opt.zero_grad()\n"
        "    nn.functional.cross_entropy(m(torch.randn(4, 3, 8, 8)), torch.zeros(4).long())"
        ".backward()\n"
        "    opt.step()\n"
        "    if step == 3:\n"
        "        raise RuntimeError('out of memory (simulated)')\n"
    )
    out = tmp_path / "c.zarr"
    proc = _record("--out", str(out), "--interval", "1", str(script))
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "RuntimeError: out of memory (simulated)" in err
    trace = err[err.index("Traceback") :]
    assert "crash.py" in trace and "typer" not in trace and "tdump/" not in trace, err
    assert "tdump: recorded 4 train record(s)" in err, err
    # the last line says the script failed and why, under tdump's summary
    assert err.strip().splitlines()[-1] == (
        f"tdump: crash.py failed (RuntimeError: out of memory (simulated)); {out} keeps the "
        "records committed before it"
    ), err

    from tdump._format import StoreReader

    assert StoreReader(str(out)).steps("train", 0).tolist() == [0, 1, 2, 3]


def test_crash_at_the_first_step_gives_no_interval_advice(tmp_path: Path) -> None:
    """A model that fails in its first forward (a wrong input size): one record is
    committed, and the advice to save more steps would point away from the cause."""
    script = tmp_path / "bad_input.py"
    script.write_text(
        "import sys, torch\nfrom torch import nn\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "m(torch.randn(4, 3, 16, 16))\n"
    )
    proc = _record("--out", str(tmp_path / "d.zarr"), "--interval", "1", str(script))
    assert proc.returncode == 1, proc.stderr
    assert "only one saved train step" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tdump: bad_input.py failed (RuntimeError: mat1 and mat2 shapes"), last

    script.write_text("import sys\nsys.exit(3)\n")
    proc = _record("--out", str(tmp_path / "e.zarr"), str(script))
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == (
        "tdump: bad_input.py exited with status 3; no records"
    ), proc.stderr


def test_a_script_that_trains_no_model_says_so_once(tmp_path: Path) -> None:
    script = tmp_path / "no_model.py"
    script.write_text("print('only data preparation here')\n")
    proc = _record("--out", str(tmp_path / "d.zarr"), str(script))
    assert proc.returncode == 0 and "only data preparation here" in proc.stdout
    said = [ln for ln in proc.stderr.splitlines() if "nothing recorded" in ln]
    assert said == ["tdump: no trained module was seen; nothing recorded"], proc.stderr
    assert not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--intervall", "5"], "No such option: --intervall (Possible options: --interval)"),
        (["--intervall=5"], "No such option: --intervall (Possible options: --interval)"),
        (["--ot", "x.zarr"], "No such option: --ot (Possible options: --out)"),
        (["-N", "5"], "No such option: -N"),
    ],
)
def test_mistyped_option_is_an_unknown_option_not_a_script(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    """Before SCRIPT, a word starting with '-' is a mistyped tdump option: click's own error
    (as `tdump prune --cout` gives), exit 2, the script never runs and nothing is written."""
    marker = tmp_path / "ran"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = _record("--out", str(tmp_path / "d.zarr"), *args, str(script))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "no training script" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert errors == [f"Error: {needle}"], proc.stderr
    assert "Usage: tdump record [OPTIONS] (SCRIPT | -m MODULE) [-- ARGS...]" in proc.stderr
    assert not marker.exists() and not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize(
    ("after", "name"),
    [(["--interval", "1"], "--interval"), (["-n1"], "-n"), (["--epochs", "2", "--out=x"], "--out")],
)
def test_own_option_after_script_is_refused_not_passed_on(
    tmp_path: Path, after: list[str], name: str
) -> None:
    """`tdump record train.py --interval 1` once gave --interval to the script and saved every
    100th step; `tdump loop` reads the same order as tdump's. Refused, both fixes named,
    exit 2, the script never runs and nothing is written."""
    marker = tmp_path / "ran"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = _record("--out", str(tmp_path / "d.zarr"), str(script), *after)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert errors == [
        f"Error: {name} after SCRIPT goes to {script}, not to tdump record; put it before "
        f"SCRIPT (tdump record {name} ... {script}), or after -- if {script} takes {name} "
        f"itself (tdump record {script} -- {name} ...)"
    ], proc.stderr
    assert not marker.exists() and not (tmp_path / "d.zarr").exists()


def test_script_options_pass_through_with_and_without_dashes(tmp_path: Path) -> None:
    """Options after SCRIPT are the script's own, whether or not `--` comes first (record's
    own option names only after `--`: above)."""
    script = tmp_path / "args.py"
    script.write_text("import sys\nprint('ARGV', sys.argv[1:])\n")
    for args in (
        ["--epochs", "2", "--intervall", "5"],
        ["--", "--epochs", "2", "-n", "1"],
        ["--epochs", "2", "--", "--out", "x.pt"],
    ):
        proc = _record("--out", str(tmp_path / "d.zarr"), "-n", "3", str(script), *args)
        assert proc.returncode == 0, proc.stderr
        shown = [a for a in args if a != "--"]
        assert f"ARGV {shown!r}" in proc.stdout, proc.stdout
