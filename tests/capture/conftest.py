"""Shared helpers for the capture tests: small real models, real stores on disk."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
TDUMP = str(Path(sys.executable).parent / "tdump")
SEED = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


def batch(n: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
