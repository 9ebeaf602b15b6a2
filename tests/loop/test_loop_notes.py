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
