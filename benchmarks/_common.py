"""What the benchmark scripts share: running ``_train_child.py``, cold page caches, timing.

Imported by the scripts in this folder (``from _common import ...``: each script puts
its own folder on ``sys.path`` when run), never by tdump or its tests.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: The training child every capture measurement runs (one configuration per process).
CHILD = HERE / "_train_child.py"
#: The seed's selection (tdump's ``DEFAULT_INCLUDE``), which every side-by-side run records.
SEED_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"


def run(
    cmd: Sequence[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd``; its result and wall seconds. A failure ends the benchmark with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc, secs


def compile_tdump() -> None:
    """Write tdump's bytecode (``__pycache__``), as installing a wheel does.

    Why: an editable install has none, and where ``PYTHONDONTWRITEBYTECODE`` is set (this
    machine's sandbox sets it) every ``tdump`` process would compile its ~40 modules
    again, about 0.1 s, while the peers' packages were compiled by pip. Timed commands
    should start as they would on a user's machine.
    """
    import compileall

    import tdump

    compileall.compile_dir(os.path.dirname(tdump.__file__), quiet=1)


def timed(cmd: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``cmd`` as a whole process."""
    return run(cmd, env)[1]


def train_child(
    args: Sequence[str], python: str = sys.executable, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``_train_child.py ARGS`` with ``python``; the JSON result it prints last."""
    proc, _ = run([python, str(CHILD), *args], env)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def drop_cache(path: Path) -> str:
    """Evict ``path``'s files from the page cache (drop_caches when root, else fadvise)."""
    os.sync()
    method = "posix_fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        method = "drop_caches"
    except OSError:
        pass
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return method


def files_of(path: Path) -> list[str]:
    """Every file below ``path``."""
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def cat_seconds(files: Sequence[str]) -> float:
    """Wall seconds of ``cat`` reading ``files`` (500 per process) into /dev/null."""
    t0 = time.perf_counter()
    for i in range(0, len(files), 500):
        subprocess.run(["cat", *files[i : i + 500]], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0
