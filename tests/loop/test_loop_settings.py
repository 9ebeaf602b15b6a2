"""`tdump loop` refuses what a stage would refuse before round 0 trains; `--config`; resume's start.

Every case here fails (or is decided) before any stage runs, so they run in-process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tdump.errors import ConfigError
from tdump.loop import Experiment, LoopEvents, LoopSettings
from tdump.loop._resume import prepare_resume
from tdump.loop._settings import record_options
from tests.cli.inproc import run_main
from tests.loop.conftest import BASE, TRAIN


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--criterion", "foo"], "unknown criterion 'foo'; choose one of taylor"),
        (["--scope", "foo"], "scope must be 'global' or 'per-layer', got 'foo'"),
        (["--min-channels", "0"], "min_channels must be >= 1"),
        (["--max-ratio", "2"], "max_ratio must be in (0, 1], got 2.0"),
        (["--scheduler", "foo"], "unknown scheduler 'foo'; use threads, processes, sync"),
        (["--scheduler", "bogus://host:1"], "unknown scheduler address scheme 'bogus'"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--include", "("], "invalid include_regex '('"),
        (["--input-shape", "3,0,8"], "--input-shape must look like"),
        (["--input-shape", "3,8"], "--input-shape 3,8 does not fit tinynet.TinyNet"),
        (["--config", '{"save_interval": 5}'], "--config sets save_interval, which tdump loop"),
        (["--config", '{"reduction": "zero_fraction"}'], 'but tdump loop sets it to "taylor"'),
        (["--config", '{"bogus": 1}'], "unknown hook setting(s) bogus"),
        (["--config", '{"collections": {"losses": {"save_interval": 9}}}'], "collection losses"),
    ],
)
def test_a_setting_a_stage_would_refuse_is_refused_before_round_0(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    option: list[str],
    said: str,
) -> None:
    """Refused at once, in the stage's own words: never after training, when a stored
    setting can no longer be changed."""
    exp = tmp_path / "exp"
    code, _, err = run_main(
        monkeypatch, capsys, "loop", TRAIN, "--rounds", "2", *BASE, *option, "-e", str(exp)
    )
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert said in lines[0] and "Traceback" not in err
    assert not exp.exists()


def test_config_is_added_to_what_the_loop_records() -> None:
    """The rank note's advice, `--include X --config '{"include_activations": true}'`,
    keeps the activation modules an explicit --include would otherwise drop."""
    s = LoopSettings(TRAIN, include="bn1", config={"include_activations": True})
    include, config = record_options(s)
    assert include == "bn1" and config["include_activations"] is True
    assert config["reduction"] == "taylor"
    assert "include_activations" not in record_options(LoopSettings(TRAIN, include="bn1"))[1]
    # other collections are added to the loop's, which stay as the metrics need them
    extra = {"collections": [{"name": "gradients", "save_interval": 4}], "storage_dtype": "float16"}
    config = record_options(LoopSettings(TRAIN, config=extra))[1]
    assert [c["name"] for c in config["collections"]] == ["losses", "loss_inputs", "gradients"]
    assert config["storage_dtype"] == "float16"
    with pytest.raises(ConfigError, match="give --include to choose"):
        record_options(LoopSettings(TRAIN, config={"include_activations": False}))


def _interrupted(tmp_path: Path) -> Experiment:
    exp = Experiment.create(tmp_path / "exp", LoopSettings(TRAIN, rounds=3, count=6).to_dict())
    exp.write_state({"status": "interrupted", "interrupted": "train", "round": 1, "done": {}})
    return exp


def test_a_resume_says_running_from_its_start_and_a_refused_one_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = _interrupted(tmp_path)
    before = (exp.path / "state.json").read_text()
    meta = (exp.path / "experiment.json").read_text()
    given = LoopSettings(TRAIN, stop_when="lr < 0.1")
    with pytest.raises(ConfigError, match="--stop-when"):
        prepare_resume(exp, given, LoopEvents(), replace=["stop_when"])
    assert (exp.path / "state.json").read_text() == before
    assert (exp.path / "experiment.json").read_text() == meta

    settings = prepare_resume(
        exp, LoopSettings(TRAIN, stop_when="round >= 1"), LoopEvents(), ["stop_when"]
    )
    assert settings.stop_when == "round >= 1" and settings.rounds == 3
    state = exp.state()
    assert state["status"] == "running" and state["running"]["pid"] == os.getpid()
    code, out, _ = run_main(monkeypatch, capsys, "experiments", "show", str(exp.path))
    assert code == 0 and f"status: running; resuming (process {os.getpid()}) in progress" in out
    replaced = json.loads((exp.path / "experiment.json").read_text())["replaced"]
    assert replaced[0]["from"] == {"stop_when": None}
    assert replaced[0]["to"] == {"stop_when": "round >= 1"}
