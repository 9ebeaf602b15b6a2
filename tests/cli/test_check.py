"""`tdump check`: exit codes, output, --json, file:// URLs, one-line errors, --watch (live)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tdump.capture
from tdump._control import STOPPED_EXIT_CODE, read_stop_request
from tdump.analyze import Trial
from tdump.cli.app import main
from tests.analyze.rules_helpers import append, tensor, write
from tests.procs import default_sigint

ROOT = Path(__file__).resolve().parents[2]
TDUMP = str(Path(sys.executable).parent / "tdump")
SLOW = str(ROOT / "tests" / "cli" / "scripts" / "train_slow.py")
BAD = 3


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}


def _tdump(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TDUMP, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _record(step: int) -> dict:
    loss = np.float32("nan") if step >= BAD else np.float32(1.0 / (step + 1))
    return {"loss.output_0": tensor("losses", loss, "loss")}


@pytest.fixture
def sick(tmp_path: Path) -> str:
    path = str(tmp_path / "sick.zarr")
    write(path, {"train": [(s, _record(s)) for s in range(6)]})
    return path


def _main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tdump", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def test_exit_codes_text_and_json(sick: str, capsys, monkeypatch) -> None:
    code, out, _ = _main(
        capsys,
        monkeypatch,
        "check",
        sick,
        "--rule",
        "exploding_tensor",
        "--rule",
        "vanishing_gradient",
    )
    assert code == 3
    lines = out.splitlines()
    assert lines[0] == "exploding_tensor: fired at 3 of 6 steps checked, first at step 3 (train)"
    assert lines[1] == "  step 3 (train): loss.output_0: 1 NaN, 0 Inf"
    assert (
        lines[-1]
        == "vanishing_gradient: no firing, 0 steps checked (it found no data to read in this dump)"
    )
    # the installed command, on a file:// URL, --json
    res = _tdump("check", Path(sick).as_uri(), "-r", "exploding_tensor", "--json")
    assert res.returncode == 3, res.stderr
    report = json.loads(res.stdout)
    assert report["fired"] is True and report["exit_code"] == 3
    [rule] = report["rules"]
    assert (
        rule["rule"] == "exploding_tensor" and rule["steps_checked"] == 6 and rule["error"] is None
    )
    assert [f["step"] for f in rule["fired"]] == [3, 4, 5]


def test_without_rule_every_builtin_runs(sick: str, capsys, monkeypatch) -> None:
    from tdump.analyze.rules import builtin_rules

    code, out, _ = _main(capsys, monkeypatch, "check", sick, "--json")
    report = json.loads(out)
    assert [r["rule"] for r in report["rules"]] == builtin_rules()
    assert len(report["rules"]) >= 5 and code == 3  # the NaN loss fires exploding_tensor
    fired = {r["rule"] for r in report["rules"] if r["fired"]}
    assert "exploding_tensor" in fired and "dead_relu" not in fired


def test_exit_code_constant_matches_the_library() -> None:
    from tdump.analyze.rules import FIRED_EXIT_CODE
    from tdump.cli import cmd_check

    assert cmd_check.FIRED_EXIT_CODE == FIRED_EXIT_CODE == 3


def test_healthy_dump_exits_0(tmp_path: Path, capsys, monkeypatch) -> None:
    path = str(tmp_path / "ok.zarr")
    write(path, {"train": [(s, _record(s)) for s in range(BAD)]})
    code, out, err = _main(capsys, monkeypatch, "check", path, "-r", "exploding_tensor", "-q")
    assert code == 0 and out.strip() == "exploding_tensor: no firing, 3 steps checked" and err == ""


def test_unfilled_window_says_what_it_needs(sick: str, capsys, monkeypatch) -> None:
    # 6 saved losses: window 5 needs 10; window 3 fills at the 6th (NaN from step 3: fires)
    code, out, _ = _main(capsys, monkeypatch, "check", sick, "-r", "loss_not_decreasing", "-q")
    assert code == 0 and out.strip() == (
        "loss_not_decreasing: needs 10 saved steps (2 x window 5) of loss.output_0 (train), "
        "the dump has 6: set -p window=N with N <= 3"
    )
    code, out, _ = _main(
        capsys, monkeypatch, "check", sick, "-r", "loss_not_decreasing", "-p", "window=3", "--json"
    )
    [rule] = json.loads(out)["rules"]
    assert code == 3 and rule["steps_checked"] == 1 and rule["note"] is None
    assert [f["step"] for f in rule["fired"]] == [5]


BROKEN = "class Rule:\n    def invoke_at_step(self, step)\n        return True\n"
RULES = """
class NoInvoke:
    def __init__(self, trial):
        self.trial = trial

class Raises:
    def __init__(self, trial):
        self.trial = trial

    def invoke_at_step(self, step):
        if step == 4:
            raise KeyError("missing key in my rule")
        return False
"""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-r", "FILE_BROKEN:Rule"], "has a syntax error at line 2"),
        (["-r", "FILE_RULES:Missing"], "has no class 'Missing'; rule classes there: Raises"),
        (["-r", "FILE_RULES:NoInvoke"], "has no invoke_at_step(self, step) method"),
        (
            ["-r", "exploding"],
            "unknown rule 'exploding'; built-in rules: accuracy_drop, dead_relu,",
        ),
        (["-r", "dead_relu", "-p", "layer_threshold"], "bad --param 'layer_threshold'"),
        (
            ["-r", "dead_relu", "-p", "layer_threshold=2"],
            "layer_threshold must be in [0, 1), got 2",
        ),
        (["-r", "dead_relu", "--watch", "--poll", "0"], "--poll must be > 0 seconds, got 0"),
        (
            ["-r", "exploding_tensor", "--mode", "evl"],
            "has no saved 'evl' steps; modes present: train",
        ),
        (["-r", "dead_relu", "-p", "mode=evl"], "has no saved 'evl' steps; modes present: train"),
    ],
)
def test_bad_input_is_one_line(
    sick: str, tmp_path: Path, capsys, monkeypatch, args: list[str], needle: str
) -> None:
    (tmp_path / "broken.py").write_text(BROKEN)
    (tmp_path / "rules.py").write_text(RULES)
    args = [
        a.replace("FILE_BROKEN", str(tmp_path / "broken.py")).replace(
            "FILE_RULES", str(tmp_path / "rules.py")
        )
        for a in args
    ]
    code, _, err = _main(capsys, monkeypatch, "check", sick, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (
        err
    )


def test_no_dump(tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, err = _main(
        capsys, monkeypatch, "check", str(tmp_path / "nope.zarr"), "-r", "dead_relu"
    )
    assert code == 1 and err.startswith("error: no dump at ") and len(err.strip().splitlines()) == 1


def test_a_rule_that_raises(sick: str, tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "rules.py").write_text(RULES)
    spec = f"{tmp_path / 'rules.py'}:Raises"
    code, out, err = _main(capsys, monkeypatch, "check", sick, "-r", spec, "-r", "dead_relu", "-q")
    assert code == 1, (out, err)  # an error, and no rule fired
    assert err.strip() == (
        "error: rule Raises raised KeyError: 'missing key in my rule' at step 4; "
        "it is skipped from here on, the other rules go on"
    )
    assert "dead_relu: no firing" in out
    code, out, err = _main(
        capsys, monkeypatch, "check", sick, "-r", spec, "-r", "exploding_tensor", "-q"
    )
    assert code == 3 and "exploding_tensor: fired at 3 of 6" in out and "rule Raises raised" in err


def test_watch_stops_a_writer(tmp_path: Path) -> None:
    """`tdump check --watch` started before the dump exists; this process writes it live."""
    path = str(tmp_path / "live.zarr")
    proc = subprocess.Popen(
        [
            TDUMP,
            "check",
            path,
            "--watch",
            "-r",
            "exploding_tensor",
            "--poll",
            "0.1",
            "--timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        w = write(path, {"train": [(0, _record(0))]})
        step = 1
        while read_stop_request(path) is None and step < 2000 and proc.poll() is None:
            append(w, "train", step, _record(step))
            step += 1
            time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    req = read_stop_request(path)
    assert (
        req is not None
        and req.step == BAD
        and req.reason.startswith("rule exploding_tensor fired at step 3")
    )
    assert f"stop request written to {path} (step {BAD})" in out
    first = "exploding_tensor: fired at 1 of 4 steps checked, first at step 3 (train)"
    assert out.splitlines()[0] == first


@pytest.mark.skipif(
    not hasattr(tdump.capture, "TrainingStopped"),
    reason="needs the capture hook's stop-request polling (tdump.capture.TrainingStopped, capture branch)",
)
def test_live_training_is_stopped(tmp_path: Path) -> None:
    """Training under `tdump record` with a NaN from step K; `tdump check --watch` stops it."""
    path, k = str(tmp_path / "run.zarr"), 15
    train = subprocess.Popen(
        [
            TDUMP,
            "record",
            "--out",
            path,
            "--interval",
            "1",
            SLOW,
            "--",
            "--nan-at",
            str(k),
            "--steps",
            "2000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        watcher = _tdump(
            "check",
            path,
            "--watch",
            "-r",
            "exploding_tensor",
            "--poll",
            "0.2",
            "--timeout",
            "120",
            timeout=180,
        )
        out, err = train.communicate(timeout=120)
    finally:
        train.kill()
    assert watcher.returncode == 3, watcher.stderr
    assert train.returncode == STOPPED_EXIT_CODE, err
    assert "DONE" not in out
    req = read_stop_request(path)
    assert req is not None and req.step == k
    trial = Trial(path)  # opens after the stop; every committed step is there, in order
    steps = trial.steps("train")
    assert steps == list(range(len(steps))) and k <= steps[-1], steps[-5:]
    # stopped within a few steps of the request (when the watcher came up is its own affair)
    after = trial.reader.records("train")["time"] > req.time
    assert after.sum() <= 5, (steps[-5:], after.sum())
    assert np.isnan(trial.tensor("3.weight").value(k)).sum() == 1


def test_watch_json_no_stop(sick: str, capsys, monkeypatch) -> None:
    args = ["check", sick, "--watch", "-r", "exploding_tensor", "--poll", "0.05", "--timeout", "5"]
    code, out, _ = _main(capsys, monkeypatch, *args, "--no-stop", "--json")
    report = json.loads(out)
    assert code == 3 and report["stop_request_step"] is None and read_stop_request(sick) is None
    assert [f["step"] for f in report["rules"][0]["fired"]] == [BAD]  # the watch ends at the first
    code, out, _ = _main(capsys, monkeypatch, *args, "--json")
    assert code == 3 and json.loads(out)["stop_request_step"] == BAD
    req = read_stop_request(sick)
    assert req is not None and req.step == BAD


def test_ctrl_c_while_watching_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C in any command: ``error: interrupted``, exit 130 (typer would exit silently)."""
    dump = str(ROOT / "sample_dumps" / "tiny.zarr")
    proc = subprocess.Popen(
        [TDUMP, "check", dump, "-r", "dead_relu", "--watch", "--quiet"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(),
        preexec_fn=default_sigint,
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("watching ")  # past start-up, inside the command
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert rest.strip().splitlines() == ["error: interrupted"]
