"""A round with no accuracy under `--stop-when accuracy_drop ...`: its row is kept, a resume
with another condition decides it; `--config` reaches `tdump record`; a finished experiment.

One loop trains round 0 (module fixture); the tests after it only resume or read it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tdump._store_reader import StoreReader
from tests.loop.conftest import BASE, TRAIN, rows_of, run_tdump

#: Selects relu1's output and bn2's by name; relu2's only by its type (include_activations).
INCLUDE = r"relu1|bn2\.output_0"


@pytest.fixture(scope="module")
def unreported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Round 0 of a script that reports nothing and evaluates without its loss module."""
    exp = tmp_path_factory.mktemp("unreported") / "exp"
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "2", *BASE, "--stop-when", "accuracy_drop > 0.5",
        "--include", INCLUDE, "--config", '{"include_activations": true}',
        "--experiment", str(exp), "--", "--no-report", "--functional-eval",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr + proc.stdout
    return exp, proc.stderr


def test_config_reaches_the_record_stage(unreported: tuple[Path, str]) -> None:
    exp, _ = unreported
    reader = StoreReader(str(exp / "round_000" / "dump.zarr"))
    config = reader.meta()["config"]
    assert config["include_regex"] == INCLUDE and config["include_activations"] is True
    assert config["reduction"] == "taylor"
    names = set(reader.tensor_names("train"))
    # relu2 matches no part of --include: recorded because --config turned the types on
    assert {"relu1.output_0.taylor", "bn2.output_0.taylor", "relu2.output_0.taylor"} <= names
    settings = json.loads((exp / "experiment.json").read_text())["settings"]
    assert settings["config"] == {"include_activations": True}  # what a resume records with


def test_a_stop_condition_the_round_cannot_answer_keeps_its_row(
    unreported: tuple[Path, str], tmp_path: Path
) -> None:
    exp0, err = unreported
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "needs accuracy_drop, which this round does not have" in lines[0]
    assert "tdump.report(" in lines[0]
    hint = f"tdump loop --resume --experiment {exp0} --arch tinynet.TinyNet --stop-when EXPR"
    assert hint in lines[0] and "params_ratio" in lines[0]
    rows = rows_of(exp0)
    assert [r["round"] for r in rows] == [0] and rows[0]["accuracy"] is None
    assert rows[0]["stop_reason"] is None and rows[0]["params"] > 0
    state = json.loads((exp0 / "state.json").read_text())
    assert state["status"] == "failed" and state["error"].count("round 0 measure") == 1

    exp = tmp_path / "exp"
    shutil.copytree(exp0, exp)
    arch = ["--arch", "tinynet.TinyNet"]
    again = run_tdump("loop", "--resume", "--experiment", str(exp), *arch)
    assert again.returncode == 1 and "needs accuracy_drop" in again.stderr
    assert len(rows_of(exp)) == 1
    # a condition over what the round has decides round 0 without training it again
    trained = (exp / "round_000" / "model.pt").stat().st_mtime_ns
    done = run_tdump(
        "loop", "--resume", "--experiment", str(exp), *arch, "--stop-when", "round >= 0"
    )
    assert done.returncode == 0, done.stderr
    assert "note: --stop-when is now 'round >= 0' (was 'accuracy_drop > 0.5')" in done.stdout
    assert "ignored" not in done.stdout
    rows = rows_of(exp)
    assert [r["stop_reason"] for r in rows] == ["stop-when: round >= 0 (round=0)"]
    assert (exp / "round_000" / "model.pt").stat().st_mtime_ns == trained
    assert not (exp / "round_001").exists()
    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["settings"]["stop_when"] == "round >= 0"
    assert meta["replaced"][0]["from"] == {"stop_when": "accuracy_drop > 0.5"}

    # finished: a resume prints the table, and imports nothing (so needs no --arch)
    shown = run_tdump("loop", "--resume", "--experiment", str(exp), "--stop-when", "round > 5")
    assert shown.returncode == 0, shown.stderr
    assert f"{exp} is finished (stop-when: round >= 0 (round=0))" in shown.stdout
    assert f"--init {exp}/round_000/checkpoint.pt --arch tinynet.TinyNet" in shown.stdout
    assert "ignored: --stop-when 'round > 5'" in shown.stdout
    assert json.loads((exp / "experiment.json").read_text()) == meta
