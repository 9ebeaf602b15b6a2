"""`tdump record -m pkg.train`: a training module inside a package, run as `python -m` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdump._format import StoreReader

TDUMP = str(Path(sys.executable).parent / "tdump")

_TRAIN = """\
import sys

import torch
from torch.nn import functional as F

from .models import Net  # a relative import: runs only as part of the package

print("ARGV", [__name__, sys.argv[1:], sys.argv[0].endswith("train.py")])
if "--crash" in sys.argv:
    raise RuntimeError("the module's own error")
model = Net()
opt = torch.optim.SGD(model.parameters(), 0.1)
for _ in range(3):
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.randint(0, 3, (4,))).backward()
    opt.step()
"""

_MODELS = """\
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder holding package ``pkg`` (``pkg.train`` trains; ``pkg.__main__`` runs it)
    and package ``nomain`` (no ``__main__``)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(_MODELS)
    (pkg / "train.py").write_text(_TRAIN)
    (pkg / "__main__.py").write_text("from . import train  # noqa: F401\n")
    (tmp_path / "nomain").mkdir()
    (tmp_path / "nomain" / "__init__.py").write_text("")
    return tmp_path


def _run(cwd: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TDUMP_CONFIG", None)
    env.pop("PYTHONPATH", None)  # the module is found from the folder, as python -m finds it
    return subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def _argv_line(stdout: str) -> str:
    return next(ln for ln in stdout.splitlines() if ln.startswith("ARGV"))


def test_a_module_records_as_python_m_runs_it(project: Path) -> None:
    plain = _run(project, sys.executable, "-m", "pkg.train", "--epochs", "2", "--x")
    assert plain.returncode == 0, plain.stderr
    proc = _run(project, TDUMP, "record", "-n", "1", "-m", "pkg.train", "--epochs", "2", "--x")
    assert proc.returncode == 0, proc.stderr
    # __name__, the arguments and argv[0] as python -m gives them to the module
    assert _argv_line(proc.stdout) == _argv_line(plain.stdout)
    assert "'__main__', ['--epochs', '2', '--x'], True" in _argv_line(proc.stdout)
    reader = StoreReader(str(project / "tdump.zarr"))
    assert reader.steps("train").tolist() == [0, 1, 2]
    assert "relu.output_0.grad" in reader.tensor_names("train")


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "pkg", "--", "--y"],  # a package: its __main__
        ["--module=pkg.train", "--", "--y"],
        ["-mpkg.train", "--y"],
    ],
)
def test_module_spellings_and_packages(project: Path, args: list[str]) -> None:
    proc = _run(project, TDUMP, "record", "-o", "d.zarr", *args)
    assert proc.returncode == 0, proc.stderr
    assert "['--y']" in _argv_line(proc.stdout)
    assert StoreReader(str(project / "d.zarr")).steps("train").tolist() == [0]


def test_the_launcher_entry_point_takes_a_module(project: Path) -> None:
    env_cmd = (sys.executable, "-m", "tdump.capture.auto", "-m", "pkg.train", "--z")
    proc = _run(project, *env_cmd)
    assert proc.returncode == 0, proc.stderr
    assert "['--z']" in _argv_line(proc.stdout)
    assert StoreReader(str(project / "tdump.zarr")).steps("train").tolist() == [0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-m", "nosuch.train"], "cannot find module 'nosuch.train': No module named 'nosuch'"),
        (["-m", "pkg.nosuch"], "no module named 'pkg.nosuch' from "),
        (["-m", "nomain"], "nomain is a package without a __main__ module"),
        (["-m", ""], "-m needs a module name after it"),
        ([], "give the training script (tdump record train.py) or -m MODULE"),
        (["-m", "pkg.train", "pkg/train.py"], None),  # pkg/train.py: the module's argument
    ],
)
def test_bad_modules_are_one_line_and_write_nothing(
    project: Path, args: list[str], needle: str | None
) -> None:
    proc = _run(project, TDUMP, "record", "-o", "d.zarr", *args)
    if needle is None:
        assert proc.returncode == 0 and "['pkg/train.py']" in _argv_line(proc.stdout)
        return
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (project / "d.zarr").exists()


def test_own_option_after_the_module_is_refused(project: Path) -> None:
    proc = _run(project, TDUMP, "record", "-o", "d.zarr", "-m", "pkg.train", "--interval", "1")
    assert proc.returncode == 2, proc.stderr
    assert "--interval after -m MODULE goes to pkg.train, not to tdump record" in proc.stderr
    assert not (project / "d.zarr").exists()


def test_a_scripts_own_dash_m_still_goes_to_the_script(project: Path) -> None:
    script = project / "s.py"
    script.write_text("import sys\nprint('ARGV', sys.argv[1:])\n")
    proc = _run(project, TDUMP, "record", "-o", "d.zarr", str(script), "-m", "resnet18")
    assert proc.returncode == 0, proc.stderr
    assert "ARGV ['-m', 'resnet18']" in proc.stdout


def test_a_crashing_module_shows_its_traceback_and_name(project: Path) -> None:
    proc = _run(project, TDUMP, "record", "-o", "d.zarr", "-m", "pkg.train", "--crash")
    assert proc.returncode == 1
    assert 'pkg/train.py", line 10, in <module>' in proc.stderr, proc.stderr
    assert "RuntimeError: the module's own error" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "tdump: pkg.train failed (RuntimeError: the module's own error); no records"
    )
