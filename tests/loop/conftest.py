"""Helpers for the loop tests: the tiny training script, running `tdump loop` as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"
TRAIN = str(SCRIPTS / "train_loop.py")
#: A 16+16-channel net, 6 channels per round, every other step saved.
BASE = ["--count", "6", "--arch", "tinynet.TinyNet", "--interval", "2", "--scheduler", "sync"]
#: Up to 4 rounds, stopped by a condition after round 2: whichever 6 channels go,
#: round 1 keeps 64-69 % of the parameters and round 2 at most 44 % (TinyNet's sizes).
STOP = ["--rounds", "4", "--stop-when", "params_ratio < 0.6 and accuracy > 0"]


def tdump_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tdump", *args]


def run_tdump(
    *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run(
        tdump_cmd(*args), capture_output=True, text=True, env=full, timeout=timeout
    )


def rows_of(exp: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (exp / "rounds.jsonl").read_text().splitlines() if line]


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without what legitimately differs between two runs (wall times)."""
    return [{k: v for k, v in r.items() if k != "wall"} for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(uri: str, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not start: {(tmp / 'server.log').read_text()[-500:]}"
                )
            time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real `mlflow server` on a free loopback port, sqlite backend, temp artifacts."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tdump[mlflow]')")
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - the server writes it until teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
         "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    # Not waited for here: the loop's MLflow client retries while the server starts,
    # so its start-up overlaps round 0's training; the test waits before reading back.
    uri = f"http://127.0.0.1:{port}"
    yield uri, lambda: _wait_ready(uri, proc, tmp)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def base(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[Path, str | None]:
    """One uninterrupted loop, 3 rounds (logged to MLflow when it is installed)."""
    exp = tmp_path_factory.mktemp("base") / "exp"
    env: dict[str, str] = {}
    extra: list[str] = []
    uri = None
    try:
        uri, _ = request.getfixturevalue("mlflow_server")
        env["MLFLOW_TRACKING_URI"] = uri
        extra = ["--mlflow"]
    except pytest.skip.Exception:
        pass
    proc = run_tdump("loop", TRAIN, *STOP, *BASE, *extra, "--experiment", str(exp), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return exp, uri
