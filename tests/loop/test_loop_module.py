"""`tdump loop -m looppkg.train`: the loop trains with a module of a package, as `python -m` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tdump
from tests.cli.test_record_module import _MODELS
from tests.loop.conftest import rows_of, tdump_cmd

_TRAIN = """\
import argparse

import torch
from torch.nn import functional as F

from .models import Net  # a relative import: runs only as part of the package

p = argparse.ArgumentParser()
p.add_argument("--init")
p.add_argument("--out", required=True)
a = p.parse_args()
torch.manual_seed(0)
model = Net() if a.init is None else __import__("tdump").load(a.init, arch=Net)
opt = torch.optim.SGD(model.parameters(), 0.1)
for _ in range(4):
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.randint(0, 3, (4,))).backward()
    opt.step()
torch.save(model.state_dict(), a.out)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    looppkg = tmp_path / "looppkg"
    looppkg.mkdir()
    (looppkg / "__init__.py").write_text("")
    (looppkg / "models.py").write_text(_MODELS)
    (looppkg / "train.py").write_text(_TRAIN)
    return tmp_path


def _loop(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # only tdump's checkout on the path: the package is found from the folder, as
    # python -m finds it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(Path(tdump.__file__).resolve().parents[1])
    return subprocess.run(
        tdump_cmd("loop", *args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_two_rounds_from_a_module(project: Path) -> None:
    proc = _loop(
        project,
        *("-m", "looppkg.train", "--arch", "looppkg.models.Net", "--rounds", "2", "--count", "1"),
        *("--interval", "1", "--scheduler", "sync", "-e", "exp", "--", "--init", "{init}"),
        *("--out", "{out}"),
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    exp = project / "exp"
    rows = rows_of(exp)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["params"] < rows[0]["params"]
    settings = json.loads((exp / "experiment.json").read_text())["settings"]
    assert settings["script"] == "looppkg.train" and settings["module"] is True
    assert " -m looppkg.train -- " in (exp / "commands.sh").read_text()
    sys.path.insert(0, str(project))
    try:
        from looppkg.models import Net  # type: ignore[import-not-found]

        model = tdump.load(exp / "round_001" / "checkpoint.pt", arch=Net)
    finally:
        sys.path.remove(str(project))
        for name in [m for m in sys.modules if m.split(".")[0] == "looppkg"]:
            del sys.modules[name]  # later tests' packages of their own
    assert model.conv.out_channels == 3
    assert model(torch.randn(2, 1, 6, 6)).shape == (2, 3)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-m", "looppkg.nosuch"], "error: no module named 'looppkg.nosuch' from "),
        (
            ["looppkg/train.py", "-m", "looppkg.train"],
            "give the training script (looppkg/train.py) or -m MODULE",
        ),
    ],
)
def test_a_bad_module_is_refused_before_any_round(
    project: Path, args: list[str], needle: str
) -> None:
    proc = _loop(project, *args, "--rounds", "2", "--count", "1", "-e", "exp")
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert not (project / "exp").exists()
