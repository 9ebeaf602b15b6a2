"""`tdump loop` end to end on a tiny net: rounds, checkpoints, stop, resume, crash, MLflow."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tdump
from tdump._format import StoreReader
from tests.cli.inproc import run_main
from tests.loop.conftest import (
    BASE,
    SCRIPTS,
    STOP,
    TRAIN,
    comparable,
    rows_of,
    run_tdump,
    tdump_cmd,
)
from tests.procs import default_sigint


def _tinynet() -> Any:
    """The test script's own model class: named by the caller, so tdump may build it."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module("tinynet").TinyNet
    finally:
        sys.path.remove(str(SCRIPTS))


def _script_data() -> Any:
    """The training script's own data() (loaded by path, its folder importable)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("train_loop_data", TRAIN)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.data
    finally:
        sys.path.remove(str(SCRIPTS))


def test_three_rounds_shrink_and_every_checkpoint_runs(base: tuple[Path, str | None]) -> None:
    exp, _ = base
    rows = rows_of(exp)
    assert [r["round"] for r in rows] == [0, 1, 2]
    params = [r["params"] for r in rows]
    assert params[0] > params[1] > params[2]
    xt, yt = _script_data()(128, seed=2)
    sys.path.insert(0, str(SCRIPTS))  # the checkpoints name tinynet.TinyNet
    try:
        for r in rows:
            for key in (
                "accuracy",
                "loss",
                "train_accuracy",
                "train_loss",
                "params_ratio",
                "flops_ratio",
            ):
                assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
            folder = exp / f"round_{r['round']:03d}"
            raw = torch.load(folder / "model.pt", weights_only=True)  # as the script saved it
            ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
            assert ckpt["format"] == "tdump.checkpoint"
            model = tdump.load(folder / "checkpoint.pt", arch=_tinynet()).eval()
            assert sum(p.numel() for p in model.parameters()) == r["params"]
            assert {k: v.shape for k, v in raw.items()} == {
                k: v.shape for k, v in model.state_dict().items()
            }
            assert r["channels"] == {
                "conv1": model.conv1.out_channels,
                "conv2": model.conv2.out_channels,
            }
            with torch.no_grad():
                logits = model(xt)
            # the reported accuracy, recomputed independently from the saved checkpoint
            assert r["accuracy"] == pytest.approx(float((logits.argmax(1) == yt).float().mean()))
            # and the no-code path (eval loss inputs in the dump) agrees with the report
            assert r["eval_accuracy"] == pytest.approx(r["accuracy"])
            assert r["loss"] == pytest.approx(
                float(torch.nn.functional.cross_entropy(logits, yt)), rel=1e-5
            )
    finally:
        sys.path.remove(str(SCRIPTS))
    assert rows[1]["accuracy_drop"] == pytest.approx(rows[0]["accuracy"] - rows[1]["accuracy"])
    assert rows[2]["params_ratio"] == pytest.approx(params[2] / params[0])
    assert all(r["removed"] == 6 for r in rows[1:])
    commands = (exp / "commands.sh").read_text()
    assert commands.count("tdump rank ") == 2 and commands.count("tdump prune ") == 2
    assert commands.count("tdump record ") == 3
    # taylor ranks from the Taylor term recorded at the source: no full tensors, no parameters
    names = StoreReader(str(exp / "round_000" / "dump.zarr")).tensor_names("train")
    assert {"relu1.output_0.taylor", "relu2.output_0.taylor"} <= set(names)
    assert not [n for n in names if n.startswith("relu") and not n.endswith(".taylor")]
    assert not [n for n in names if n.endswith(("weight", "weight.grad"))]


def test_full_tensors_records_activations_and_gradients(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "1", "--full-tensors", *BASE, "--experiment", str(exp)
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    names = set(StoreReader(str(exp / "round_000" / "dump.zarr")).tensor_names("train"))
    assert {"relu1.output_0", "relu1.output_0.grad", "relu2.output_0.grad"} <= names
    assert {"conv1.weight", "conv1.weight.grad"} <= names  # tdump record's default selection
    assert not [n for n in names if n.endswith(".taylor")]


def test_experiments_show_plot_compare(
    base: tuple[Path, str | None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from typer.testing import CliRunner

    from tdump.cli.app import app

    exp, _ = base
    runner = CliRunner()
    shown = runner.invoke(app, ["experiments", "show", str(exp), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["status"] == "stopped" and data["rounds"] == rows_of(exp)
    text = runner.invoke(app, ["experiments", "show", str(exp)])
    assert "round 2 stopped the loop: stop-when" in text.stdout
    assert "status: stopped" in text.stdout
    # several experiments (what a shell glob such as experiments/train-* expands to)
    other = tmp_path / "copy"
    shutil.copytree(exp, other)
    both = runner.invoke(app, ["experiments", "show", str(exp), str(other)])
    assert both.exit_code == 0, both.output
    assert both.stdout.count("status: stopped") == 2 and f"{other}: " in both.stdout
    lines = runner.invoke(app, ["experiments", "show", str(exp), str(other), "--json"]).stdout
    assert [json.loads(x)["experiment"] for x in lines.splitlines()] == [str(exp), str(other)]
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    plot = runner.invoke(app, ["experiments", "plot", str(exp), "-o", str(png)])
    assert plot.exit_code == 0, plot.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    cmp_png = tmp_path / "cmp.png"
    cmp = runner.invoke(app, ["experiments", "compare", str(exp), str(exp), "-o", str(cmp_png)])
    assert cmp.exit_code == 0 and cmp_png.stat().st_size > 10_000
    # a suffix matplotlib cannot write, or a folder: one line before any drawing, nothing written
    for bad, said in ((tmp_path / "curve.xyz", "suffix '.xyz'"), (tmp_path, "is a directory")):
        code, _, err = run_main(
            monkeypatch, capsys, "experiments", "plot", str(exp), "-o", str(bad)
        )
        assert code == 1 and err.startswith("error: ") and said in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "curve.xyz").exists()


def test_mlflow_runs_read_back_from_the_server(
    base: tuple[Path, str | None], mlflow_server: Any
) -> None:
    exp, uri = base
    assert uri is not None
    mlflow_server[1]()  # the server is up
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[f"tdump/{exp.name}"], order_by=["params.round ASC"])
    rows = rows_of(exp)
    assert sorted(runs["params.round"].astype(int)) == [0, 1, 2]
    by_round = {int(r["params.round"]): r for _, r in runs.iterrows()}
    for row in rows:
        run = by_round[row["round"]]
        assert run["metrics.params"] == row["params"]
        assert run["metrics.accuracy"] == pytest.approx(row["accuracy"])
        arts = [
            a.path for a in mlflow.MlflowClient(uri).list_artifacts(run["run_id"], "checkpoint")
        ]
        assert arts == ["checkpoint/checkpoint.pt"]


def test_stop_when_stops_at_the_first_round_it_holds(base: tuple[Path, str | None]) -> None:
    exp, _ = base
    rows = rows_of(exp)  # --rounds 4 --stop-when 'params_ratio < 0.6 and accuracy > 0'
    assert [r["params_ratio"] >= 0.6 for r in rows] == [True, True, False]
    assert [r["stop_reason"] for r in rows[:2]] == [None, None]
    reason = rows[2]["stop_reason"]
    assert reason.startswith("stop-when: params_ratio < 0.6 and accuracy > 0 (accuracy=")
    assert f"params_ratio={rows[2]['params_ratio']:.4g}" in reason
    assert not (exp / "round_003").exists()
    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "stopped" and state["stop_reason"] == reason


def _wait_for_stage(exp: Path, r: int, stage: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the loop ended before the stage to interrupt"
        try:
            state = json.loads((exp / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("round") == r and (state.get("running") or {}).get("stage") == stage:
            return
        time.sleep(0.05)
    pytest.fail(f"round {r} {stage} never started")


def _loop_until(exp: Path, r: int, stage: str) -> subprocess.Popen[str]:
    """The base loop in ``exp``, in its own process group, once round ``r``'s ``stage`` runs."""
    args = ["loop", TRAIN, *STOP, *BASE, "--experiment", str(exp)]
    proc = subprocess.Popen(tdump_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=default_sigint)  # fmt: skip
    _wait_for_stage(exp, r, stage, proc)
    return proc


@pytest.mark.slow  # a long loop run: in CI's `make test-slow`, kept out of `make test`'s 10 minutes
def test_sigkill_in_rank_then_crash_then_resume(
    base: tuple[Path, str | None], tmp_path: Path
) -> None:
    exp = tmp_path / "exp"
    proc = _loop_until(exp, 2, "rank")
    time.sleep(0.5)  # inside the rank process, or the stage after it (rank can be quicker)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(rows_of(exp)) == 2
    # what a kill inside write_ranks / a checkpoint save leaves (the timing decides whether
    # this kill did): their hidden temporaries, which the resume below must not keep
    for leftover in (".ranks.partial.parquet.0123456789ab.partial", ".tdump-0123456789ab.partial"):
        (exp / "round_002" / leftover).write_bytes(b"half a file")
    killed_in = json.loads((exp / "state.json").read_text())["running"]["stage"]  # rank, or later
    shown = run_tdump("experiments", "show", str(exp)).stdout
    assert f"round 2 {killed_in} was killed (process {proc.pid} is gone)" in shown
    assert f"continue with tdump loop --resume --experiment {exp}" in shown
    round1 = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (exp / "round_001").iterdir()
    }
    rounds1_logged = (exp / "commands.sh").read_text().count("# round 1:")

    # resumed, the script now fails in round 2: its error and exit code, rounds 0-1 intact
    arch = ["--arch", "tinynet.TinyNet"]  # an import path read from experiment.json: re-given
    refused = run_tdump("loop", "--resume", "--experiment", str(exp))
    assert refused.returncode != 0 and "--arch tinynet.TinyNet" in refused.stderr
    assert "never imports a name read from a file" in refused.stderr
    assert len(rows_of(exp)) == 2
    crashed = run_tdump(
        "loop", "--resume", "--experiment", str(exp), *arch, env={"LOOP_TEST_CRASH_ROUND": "2"}
    )
    assert crashed.returncode == 3
    err = crashed.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: round 2 train failed (exit 3): injected failure in round 2"
    )
    assert [r["round"] for r in rows_of(exp)] == [0, 1]
    show = run_tdump("experiments", "show", str(exp), "--json")
    shown = json.loads(show.stdout)
    assert shown["status"] == "failed" and "injected failure" in shown["error"]
    assert shown["error"].startswith("round 2 train failed (exit 3)")  # said once
    assert [r["round"] for r in shown["rounds"]] == [0, 1]

    resumed = run_tdump("loop", "--resume", "--experiment", str(exp), *arch)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(rows_of(exp)) == comparable(rows_of(base[0]))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (exp / "round_001").iterdir()}
    assert after == round1  # round 1 neither redone nor touched
    assert (exp / "commands.sh").read_text().count("# round 1:") == rounds1_logged
    assert not list(exp.rglob("*.partial*"))


def test_ctrl_c_marks_the_experiment_interrupted_and_resume_finishes_it(
    base: tuple[Path, str | None], tmp_path: Path
) -> None:
    exp = tmp_path / "exp"
    proc = _loop_until(exp, 1, "train")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted; continue with tdump loop --resume --experiment {exp}"
    )
    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "interrupted" and state["interrupted"] == "train"
    assert state["running"] is None and len(rows_of(exp)) == 1
    shown = run_tdump("experiments", "show", str(exp)).stdout
    assert "status: interrupted (Ctrl-C in round 1 train); continue with tdump loop" in shown

    resumed = run_tdump("loop", "--resume", "--experiment", str(exp), "--arch", "tinynet.TinyNet")
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(rows_of(exp)) == comparable(rows_of(base[0]))
    assert json.loads((exp / "state.json").read_text())["status"] == "stopped"
    assert not list(exp.rglob("*.partial*"))


TORCHVISION_SCRIPT = """import os, torch, torchvision, tdump
from torch import nn
torch.manual_seed(0)
init = os.environ.get("TDUMP_INIT")
model = tdump.load(init) if init else torchvision.models.resnet18(num_classes=3)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
for _ in range(2):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
model.eval()
with torch.no_grad():
    tdump.report(accuracy=(model(x).argmax(1) == y).float().mean())
torch.save(model.state_dict(), os.environ["TDUMP_OUT"])
"""


def test_a_torchvision_model_needs_no_arch(tmp_path: Path) -> None:
    """Round 0's plain state_dict: the architecture comes from the dump, and is said."""
    script = tmp_path / "train.py"
    script.write_text(TORCHVISION_SCRIPT)
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", str(script), "--rounds", "1", "--interval", "1", "--experiment", str(exp)
    )
    assert proc.returncode == 0, proc.stderr
    assert "note: architecture torchvision.models.resnet18 inferred" in proc.stdout
    assert "note: num_classes=3 inferred" in proc.stdout
    raw = torch.load(exp / "round_000" / "checkpoint.pt", weights_only=True)
    assert raw["arch"] == "torchvision.models.resnet18" and raw["arch_kwargs"] == {"num_classes": 3}
    assert rows_of(exp)[0]["params"] == sum(
        p.numel() for p in tdump.load(exp / "round_000" / "checkpoint.pt").parameters()
    )


@pytest.mark.slow  # a long loop run: in CI's `make test-slow`, kept out of `make test`'s 10 minutes
def test_commands_sh_reruns_the_experiment_in_an_empty_folder(
    base: tuple[Path, str | None], tmp_path: Path
) -> None:
    """`sh commands.sh` elsewhere redoes the stages, the in-process checkpoint step
    included, into the same files: here up to round 1's prune, whose input is the
    round 0 checkpoint that only the loop's measure step used to make."""
    exp, _ = base
    text = (exp / "commands.sh").read_text()
    assert text.count("python -m tdump.loop checkpoint ") == 3  # one per round
    head = text[: text.index("# round 1: train (environment)")]
    script = tmp_path / "replay" / "commands.sh"
    script.parent.mkdir()
    script.write_text(head.replace(str(exp), "exp"))  # the same commands, here
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["sh", str(script)], cwd=script.parent, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("round_000/checkpoint.pt", "round_001/ranks.parquet", "round_001/init.pt"):
        assert (script.parent / "exp" / name).is_file(), name
    for name in ("round_000/checkpoint.pt", "round_001/init.pt"):
        again = torch.load(script.parent / "exp" / name, weights_only=True)
        first = torch.load(exp / name, weights_only=True)
        assert again["arch"] == first["arch"] and again["plan"] == first["plan"]
        assert again["state_dict"].keys() == first["state_dict"].keys()
        assert all(torch.equal(v, first["state_dict"][k]) for k, v in again["state_dict"].items())
