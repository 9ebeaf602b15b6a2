"""`tdump loop` relays its stages' `note:` and `warning:` lines to its own console."""

from __future__ import annotations

from pathlib import Path

from tests.loop.conftest import BASE, TRAIN, run_tdump


def test_rank_and_record_notes_reach_the_loops_stderr(tmp_path: Path) -> None:
    """With the default --interval 100, an 8-step script saves step 0 only: the loop
    prunes from the untrained model, and says so on its console, not just in the logs."""
    exp = tmp_path / "exp"
    options = [a for a in BASE if a not in ("--interval", "2")]
    proc = run_tdump("loop", TRAIN, "--rounds", "2", *options, "--experiment", str(exp))
    assert proc.returncode == 0, proc.stderr
    rank = "round 1 rank: note: taylor scores rest on one saved step (step 0, the untrained model)"
    record = "round 0 train: warning: only one saved train step with the model's tensors (step 0)"
    err = proc.stderr.splitlines()
    assert sum(line.startswith(rank) for line in err) == 1, err
    # round 1's dump has the same one step: the identical warning is not repeated
    assert sum(line.startswith(record) for line in err) == 1, err
    assert "round 1 train: warning" not in proc.stderr
    # the logs keep what the stages printed, as before
    assert "note: taylor scores rest on one saved step" in (exp / "round_001/rank.log").read_text()
    assert "tdump: warning: only one saved" in (exp / "round_001/train.log").read_text()


def test_a_rank_hint_to_record_more_is_said_as_the_loops_option(tmp_path: Path) -> None:
    """Rank's "record X: tdump record --include ..." becomes the loop's own --include."""
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "2", *BASE, "--include", ".*relu1", "--experiment", str(exp)
    )
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("round 1 rank: note: no ")]
    assert len(notes) == 1 and "scores for 1 conv layer (conv2)" in notes[0], proc.stderr
    assert (
        "record those outputs with gradients: tdump loop SCRIPT --include '.*relu1|" in (notes[0])
    )
    assert notes[0].endswith(" (a new experiment)") and "tdump record" not in notes[0]
    # the stage's own log keeps rank's words
    assert ": tdump record --include '.*relu1|" in (exp / "round_001/rank.log").read_text()
