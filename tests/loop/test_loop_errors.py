"""Bad input to `tdump loop`: one line, exit != 0, nothing written or overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdump.errors import ConfigError
from tdump.loop import Experiment, parse_stop
from tests.loop.conftest import BASE, TRAIN, rows_of, run_tdump


def _one_line_error(proc: object) -> str:
    stderr = proc.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert proc.returncode != 0 and len(stderr) == 1, stderr  # type: ignore[attr-defined]
    assert stderr[0].startswith("error: ")
    return stderr[0]


def test_missing_script(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    line = _one_line_error(
        run_tdump("loop", str(tmp_path / "nope.py"), *BASE, "--experiment", str(exp))
    )
    assert "no training script at" in line and not exp.exists()


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('touch PWNED')",
        "accuracy >",
        "lr < 0.1",
        "accuracy_drop + 1",
        "(lambda: 1)() > 0",
    ],
)
def test_bad_stop_when_is_refused_and_never_run(tmp_path: Path, expr: str) -> None:
    exp = tmp_path / "exp"
    line = _one_line_error(
        run_tdump("loop", TRAIN, *BASE, "--stop-when", expr, "--experiment", str(exp))
    )
    assert "--stop-when" in line and not exp.exists() and not Path("PWNED").exists()
    with pytest.raises(ConfigError):
        parse_stop(expr)


UNGUARDED = """import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.c(x)


open("TRAINED", "w").write("trained")  # training at the top level
"""


def test_arch_that_cannot_be_found_fails_before_round_0(tmp_path: Path) -> None:
    """`--arch train.py:Nett` from a script that trains when imported: said at once, not
    after training, and finding that out runs none of the script's training."""
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED)
    exp = tmp_path / "exp"
    line = _one_line_error(
        run_tdump("loop", str(script), *BASE, "--arch", f"{script}:Nett", "--experiment", str(exp))
    )
    assert "has no class or function 'Nett'; did you mean Net?" in line, line
    assert not exp.exists() and not (tmp_path / "TRAINED").exists()


def test_script_option_before_dashes_says_where_it_goes(tmp_path: Path) -> None:
    """`tdump loop train.py --epochs 2`: click's usage error (exit 2) says the script's
    options go after `--`; a near miss of the loop's own keeps click's suggestion."""
    exp = tmp_path / "exp"
    proc = run_tdump("loop", TRAIN, "--epochs", "2", "--experiment", str(exp))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert proc.returncode == 2 and errors == [
        "Error: No such option: --epochs (if the training script takes --epochs, put it "
        "after --: tdump loop SCRIPT [OPTIONS] -- --epochs ...)"
    ], proc.stderr
    proc = run_tdump("loop", TRAIN, "--round", "2", "--experiment", str(exp))
    assert "No such option: --round (Possible options: --count, --rounds)" in proc.stderr
    assert proc.returncode == 2 and not exp.exists()


def test_stop_expression_semantics() -> None:
    cond = parse_stop("not (accuracy_drop > 0.1) and 0.2 <= params_ratio < 0.5 or round >= 7")
    assert cond.evaluate({"accuracy_drop": 0.05, "params_ratio": 0.3, "round": 1}) is True
    assert cond.evaluate({"accuracy_drop": 0.2, "params_ratio": 0.3, "round": 1}) is False
    assert cond.evaluate({"accuracy_drop": 0.2, "params_ratio": 0.3, "round": 7}) is True
    assert cond.evaluate({"accuracy_drop": 0.0, "params_ratio": 0.5, "round": 0}) is False
    with pytest.raises(ConfigError, match="needs accuracy"):
        parse_stop("accuracy < -0.5").evaluate({"accuracy": None})


def test_non_empty_directory_that_is_not_an_experiment(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "notes.txt").write_text("mine")
    line = _one_line_error(run_tdump("loop", TRAIN, *BASE, "--experiment", str(exp)))
    assert "not a tdump experiment" in line
    assert sorted(p.name for p in exp.iterdir()) == ["notes.txt"]
    assert (exp / "notes.txt").read_text() == "mine"


def test_second_loop_on_a_locked_experiment_refuses(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    Experiment.create(exp, {"script": TRAIN, "rounds": 3, "count": 6})
    before = (exp / "experiment.json").read_text()
    with Experiment.lock(exp):
        line = _one_line_error(run_tdump("loop", "--resume", "--experiment", str(exp)))
    assert "in use by another tdump loop" in line
    assert (exp / "experiment.json").read_text() == before and not (exp / "state.json").exists()


def test_script_that_never_saves_its_checkpoint(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = run_tdump("loop", TRAIN, *BASE, "--experiment", str(exp), "--", "--no-save")
    line = _one_line_error(proc)
    assert "saved no checkpoint at" in line and "TDUMP_OUT" in line
    assert not (exp / "round_000" / "model.pt").exists() and not (exp / "rounds.jsonl").exists()
    assert json.loads((exp / "state.json").read_text())["status"] == "failed"


def test_count_larger_than_what_can_be_pruned(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", TRAIN, *[a if a != "6" else "25" for a in BASE], "--experiment", str(exp)
    )
    line = _one_line_error(proc)
    # TinyNet: 16 + 16 conv channels; a prune stage's default --max-ratio 0.8 lets
    # floor(0.8 * 16) = 12 go from each layer in one round: 24, not the 30 --min-channels allows
    assert "--count 25 is more than the 24 channels one round can prune" in line
    assert "--max-ratio 0.8" in line
    assert (exp / "round_000" / "checkpoint.pt").exists() and not (
        exp / "round_001" / "ranks.parquet"
    ).exists()


def test_count_check_counts_only_the_layers_the_next_rank_stage_scores(tmp_path: Path) -> None:
    """Only relu1 recorded: ranking scores conv1 alone, so tdump prune can take 12 channels
    (0.8 of conv1's 16), not the 24 of both convs: --count 13 is refused after round 0."""
    exp = tmp_path / "exp"
    base = [a if a != "6" else "13" for a in BASE]
    proc = run_tdump("loop", TRAIN, *base, "--include", r"(?:^|\.)relu1", "--experiment", str(exp))
    line = _one_line_error(proc)
    assert "--count 13 is more than the 12 channels one round can prune" in line
    assert "only convs that --criterion taylor can score from round 0's dump" in line
    assert rows_of(exp)[0]["prunable"] == 12  # round 0's row is kept
    assert not (exp / "round_001" / "ranks.parquet").exists()


def test_per_layer_count_is_checked_against_one_group(tmp_path: Path) -> None:
    """--scope per-layer: --count is per group. TinyNet's two 16-channel convs can each
    lose 15 (--min-channels 1, no --max-ratio default in that scope): 30 in all, so
    --count 16 passed the old check against the total, and every group fell short."""
    exp = tmp_path / "exp"
    base = [a if a != "6" else "16" for a in BASE]
    proc = run_tdump("loop", TRAIN, *base, "--scope", "per-layer", "--experiment", str(exp))
    line = _one_line_error(proc)
    assert (
        "--count 16 (per group with --scope per-layer) is more than the 15 channels "
        "any one group can lose in one round" in line
    )
    row = rows_of(exp)[0]
    assert (row["prunable"], row["prunable_per_group"]) == (30, 15)
    assert not (exp / "round_001" / "ranks.parquet").exists()


def test_resume_of_no_experiment_says_so(tmp_path: Path) -> None:
    line = _one_line_error(run_tdump("loop", "--resume", "--experiment", str(tmp_path / "none")))
    assert "no experiment to resume at" in line and "--experiment" in line
    assert not (tmp_path / "none").exists()


@pytest.mark.slow  # a long loop run: in CI's `make test-slow`, kept out of `make test`'s 10 minutes
def test_started_without_arch_then_resumed_with_it(tmp_path: Path) -> None:
    """Round 0's plain state_dict of an unregistered class: the loop says how to go on,
    and ``--resume --arch`` continues from the measure stage without retraining."""
    exp = tmp_path / "exp"
    no_arch = [a for a in BASE if a not in ("--arch", "tinynet.TinyNet")]
    line = _one_line_error(
        run_tdump("loop", TRAIN, "--rounds", "2", *no_arch, "--experiment", str(exp))
    )
    assert "round 0's checkpoint" in line and "plain state_dict" in line
    assert f"tdump loop --resume --experiment {exp}" in line and "--arch MODULE.BUILDER" in line
    # both forms --arch takes: a module's class (the recorded type) and a script's own class
    assert "e.g. tinynet.TinyNet" in line and "--arch SCRIPT.py:CLASS" in line
    assert f"e.g. {TRAIN}:Net" in line
    assert "--like" not in line  # a `tdump prune` option the loop does not have
    model = exp / "round_000" / "model.pt"
    trained = model.stat().st_mtime_ns
    assert json.loads((exp / "experiment.json").read_text())["settings"]["arch"] is None

    resumed = run_tdump(
        "loop", "--resume", "--experiment", str(exp), "--arch", "tinynet.TinyNet", "--rounds", "5"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "ignored: --rounds 5" in resumed.stdout  # the stored settings win, and it says so
    # how to go on, named once the run is done: from the round this run completed
    assert f"--init {exp}/round_001/checkpoint.pt --arch tinynet.TinyNet" in resumed.stdout
    settings = json.loads((exp / "experiment.json").read_text())["settings"]
    assert settings["arch"] == "tinynet.TinyNet" and settings["rounds"] == 2
    rows = [json.loads(x) for x in (exp / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["params"] < rows[0]["params"]
    assert model.stat().st_mtime_ns == trained  # round 0 was not trained again
    # finished: a resume only shows it, importing nothing, so the import path (still a
    # name read from a file) is not asked for
    again = run_tdump("loop", "--resume", "--experiment", str(exp))
    assert again.returncode == 0, again.stderr
    assert "is finished (rounds: 2 of 2 done)" in again.stdout
    # --rounds 3 is the option's default, but given: as ignored as --rounds 5, and the
    # note says how to go on from the finished experiment
    more = ["--arch", "tinynet.TinyNet", "--rounds", "3"]
    finished = run_tdump("loop", "--resume", "--experiment", str(exp), *more)
    assert finished.returncode == 0, finished.stderr
    assert "ignored: --rounds 3; --rounds is fixed when an experiment starts" in finished.stdout
    assert f"--init {exp}/round_001/checkpoint.pt --arch tinynet.TinyNet" in finished.stdout
    assert "is finished (rounds: 2 of 2 done)" in finished.stdout
    assert len(rows_of(exp)) == 2


def test_script_that_ignores_the_pruned_model_it_is_given(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "2", *BASE, "--experiment", str(exp), "--", "--ignore-init"
    )
    line = _one_line_error(proc)
    assert "round 1's checkpoint" in line
    assert "the script must train the pruned model the loop starts it from" in line
    assert "tdump.load(os.environ['TDUMP_INIT'])" in line and "check --arch" not in line
    assert [json.loads(x)["round"] for x in (exp / "rounds.jsonl").read_text().splitlines()] == [0]
    resume = f"tdump loop --resume --experiment {exp} --arch tinynet.TinyNet trains round 1 again"
    assert resume in line
    wrong = (exp / "round_001" / "model.pt").read_bytes()

    # the same arguments: round 1 trains again (not only measures the old file) and fails again
    again = run_tdump("loop", "--resume", "--experiment", str(exp), "--arch", "tinynet.TinyNet")
    assert "round 1 train" in again.stdout + again.stderr
    assert "round 1's checkpoint" in _one_line_error(again)

    # new TRAIN_ARGS (the first one starts with "-": click must not take it for SCRIPT)
    fixed = run_tdump(
        "loop", "--resume", "--experiment", str(exp), "--arch", "tinynet.TinyNet",
        "--", "--steps", "8",
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert "ignored" not in fixed.stdout
    assert "TRAIN_ARGS is now '--steps 8' (was '--ignore-init')" in fixed.stdout
    rows = rows_of(exp)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["params_ratio"] < 0.8
    trained = (exp / "round_001" / "model.pt").read_bytes()
    assert trained != wrong
    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["settings"]["train_args"] == ["--steps", "8"]
    assert meta["replaced"][-1]["from"] == {"train_args": ["--ignore-init"]}
    # commands.sh lists what the experiment is made of: round 1 trained once, the rejected
    # trainings taken out (round 0 still ran with --ignore-init)
    commands = (exp / "commands.sh").read_text()
    assert commands.count("# round 1: train  (") == 1
    assert commands.count("train_loop.py -- --steps 8") == 1
    assert commands.count("train_loop.py -- --ignore-init") == 1
