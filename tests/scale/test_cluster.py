"""Ranking on a Dask cluster started the way a team starts one: `dask scheduler` and
`dask worker` processes (loopback, free ports), reached with ``--scheduler tcp://...``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tdump
from tdump._version import __version__
from tdump.analyze import read_ranks
from tdump.errors import ConfigError

from .conftest import BIN, ROOT, TDUMP, LocalRun, free_port, ok, run, same_ranks, stop

DASK = str(BIN / "dask")
pytest.importorskip("distributed")


def _worker(address: str, name: str, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    # --no-nanny: one process per worker, so stopping it stops everything it started
    args = ["--name", name, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny"]
    return subprocess.Popen(
        [DASK, "worker", address, *args, "--no-dashboard", "--memory-limit", "1GB", *extra],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _wait_workers(address: str, n: int, timeout: float = 120) -> None:
    """Wait until exactly ``n`` workers are connected to ``address``."""
    from distributed import Client

    with Client(address, timeout="30s", set_as_default=False) as client:
        deadline = time.monotonic() + timeout
        while len(client.scheduler_info(n_workers=-1)["workers"]) != n:
            assert time.monotonic() < deadline, f"the cluster never had {n} workers"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dask scheduler` + two `dask worker --nthreads 1` on 127.0.0.1; their address.

    The workers cannot import torch (their preload blocks it): ranking must not need it.
    """
    no_torch = tmp_path_factory.mktemp("preload") / "no_torch.py"
    no_torch.write_text("import sys\nsys.modules['torch'] = None\n")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        procs += [_worker(address, f"w{i}", {}, "--preload", str(no_torch)) for i in (0, 1)]
        _wait_workers(address, 2)
        yield address
    finally:
        stop(procs[1:])  # workers first: they leave at once while their scheduler is up
        stop(procs[:1])


@contextmanager
def extra_worker(address: str, env: dict[str, str], *args: str) -> Iterator[None]:
    """A third worker for the duration of the block; gone again afterwards."""
    proc = _worker(address, "odd", env, *args)
    try:
        _wait_workers(address, 3)
        yield
    finally:
        stop([proc])
        _wait_workers(address, 2)


def test_rank_through_a_scheduler_address(
    cluster: str, tiny_local: LocalRun, tmp_path: Path
) -> None:
    from distributed import Client

    out = str(tmp_path / "ranks.parquet")
    proc = ok(run([TDUMP, "rank", tiny_local.path, "--scheduler", cluster, "-q", "-o", out]))
    assert "ranked 16 filters" in proc.stdout
    same_ranks(read_ranks(out), tiny_local.ranks)

    def opened() -> tuple[list[str], bool]:  # on each worker: stores its tasks opened; torch?
        import sys

        from tdump.analyze import _tasks

        torch = sys.modules.get("torch")
        return sorted({key[0] for key in _tasks._ARRAYS}), torch is not None

    with Client(cluster, set_as_default=False) as client:
        on_workers = client.run(opened)
    assert len(on_workers) == 2
    assert {p for paths, _ in on_workers.values() for p in paths} == {tiny_local.path}
    assert not any(torch for _, torch in on_workers.values())  # ranked without torch


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_worker_with_another_tdump_version_is_refused(
    cluster: str, tiny_local: LocalRun, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(ROOT / "tdump", other / "tdump", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "tdump" / "_version.py").write_text('__version__ = "0.0.1.other"\n')
    with extra_worker(cluster, {"PYTHONPATH": str(other)}), pytest.raises(ConfigError) as info:
        tdump.rank(tiny_local.path, scheduler=cluster, progress=False)
    msg = str(info.value)
    assert msg.startswith(f"Dask cluster at {cluster} does not match this client: ")
    assert f"tdump {__version__} here, 0.0.1.other on tcp://127.0.0.1:" in msg
    assert "\n" not in msg


def test_a_worker_without_tdump_is_named(
    cluster: str, tiny_local: LocalRun, tmp_path: Path
) -> None:
    # a worker whose `import tdump` really fails: its preload blocks the package
    block = tmp_path / "no_tdump.py"
    block.write_text("import sys\nsys.modules['tdump'] = None\n")
    with extra_worker(cluster, {}, "--preload", str(block)):
        proc = run([TDUMP, "rank", tiny_local.path, "--scheduler", cluster, "-q"])
    line = _one_line_error(proc)
    assert line.startswith("error: tdump is not importable on Dask worker tcp://127.0.0.1:")
    assert f"install tdump {__version__}" in line
