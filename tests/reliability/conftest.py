"""Fixtures of the reliability suite: a tiny recorded dump and a CLI runner.

The dump is written by the real capture hook from a small conv net (conv -> bn -> ReLU
twice, a linear head), so every reader sees the layout ``tdump record`` writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def tiny_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


#: The two ReLUs' outputs and gradients, the conv weights and their gradients, the loss:
#: what the criteria need, few tensors (each saved tensor costs the writer time).
TINY_INCLUDE = r"^[25]\.output|^[03]\.weight|^loss\.output"


def record_tiny(  # type: ignore[no-untyped-def]
    path: str, *, steps: int = 3, interval: int = 1, model=None, include: str = TINY_INCLUDE
) -> str:
    """Train ``model`` (default :func:`tiny_net`) ``steps`` steps under the hook at ``path``."""
    import torch
    from torch import nn

    from tdump.capture import Hook

    model = model if model is not None else tiny_net()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    hook = Hook(path, include_regex=include, save_interval=interval, strict=True)
    hook.register_module(model)
    hook.register_loss(loss_fn)
    # one thread: tests compare dumps bit for bit across processes, and a different
    # thread count (another test set it, or a fresh child) changes reduction order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 4, (4,), generator=g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    hook.close()
    return path


@pytest.fixture(scope="session")
def tiny_dump(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A pristine tiny dump; copy it (:func:`copy_dump`) before damaging it."""
    return record_tiny(str(tmp_path_factory.mktemp("reliability") / "tiny.zarr"))


@pytest.fixture(scope="session")
def tiny_dump_v1(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny run stored in format 1 (one chunk file per record), as tdump wrote it before store format 2."""
    import tdump._format as fmt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fmt, "FORMAT_VERSION", 1)
        return record_tiny(str(tmp_path_factory.mktemp("reliability-v1") / "tiny.zarr"))


def copy_dump(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def tree_digest(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes below ``path`` (inputs unchanged?)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@dataclass
class Result:
    code: int
    out: str
    err: str


def tdump_cli(*args: str, columns: int = 200, timeout: float = 120) -> Result:
    """Run the ``tdump`` CLI in a subprocess (this interpreter, this environment)."""
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    cmd = [sys.executable, "-c", "from tdump.cli.app import main; main()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``run_cli(*args) -> Result``: the CLI's ``main()`` in this process (no start-up cost)."""
    from tdump.cli.app import main

    def run(*args: str, columns: int = 200) -> Result:
        capsys.readouterr()
        monkeypatch.setenv("COLUMNS", str(columns))
        monkeypatch.setattr(sys, "argv", ["tdump", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def one_line_error(res: Result) -> str:
    """The single ``error: ...`` line of a failed run (asserts there is exactly one)."""
    assert res.code != 0, (res.out, res.err)
    assert "Traceback" not in res.err, res.err
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]
