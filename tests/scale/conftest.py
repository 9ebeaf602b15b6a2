"""Fixtures for the scale-out tests: a real S3 endpoint (moto's server), real Dask
processes, and one small training run recorded locally as the reference.

Every server binds 127.0.0.1 only; nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TDUMP = str(BIN / "tdump")
SCRIPTS = ROOT / "tests" / "capture" / "scripts"
TINY = str(SCRIPTS / "train_tiny.py")
# what the ranking needs and little more (every request costs on an object store):
# ReLU outputs and their gradients (the loss and its inputs come with them), 3 steps
TINY_RECORD = ["-n", "1", "-i", "relu", TINY, "--", "--steps", "3"]
SCORES = ["score", "score_norm"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(procs: list[subprocess.Popen[Any]]) -> None:
    """Terminate ``procs`` (ours only), then kill whatever did not exit in 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: int = 180
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root; the environment passes through."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------- S3
@dataclass
class S3:
    """A bucket on the moto server and how to reach it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """The same endpoint and credentials as fsspec storage_options (no variables needed)."""
        return {
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint},
        }


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port: a real HTTP endpoint in its own process."""
    pytest.importorskip("moto.server", reason="the s3 tests need moto[server] (a dev dependency)")
    pytest.importorskip("s3fs", reason="the s3 tests need tdump[s3] (s3fs)")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    for _attempt in range(3):  # a port taken between free_port() and bind: try another
        port = free_port()
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answered
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None and time.monotonic() < deadline:
            try:
                yield endpoint
            finally:
                stop([proc])
            return
        stop([proc])
    pytest.fail(f"moto's server did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def s3(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A fresh bucket, with the standard AWS variables pointing at it for the module.

    The variables (``AWS_ENDPOINT_URL`` included, which botocore honours) reach the
    ``tdump`` subprocesses and Dask workers; no AWS config file of the machine is read.
    """
    import s3fs

    home = tmp_path_factory.mktemp("aws")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    bucket = f"tdump-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        target = S3(moto_endpoint, bucket, env)
        s3fs.S3FileSystem(**target.storage_options).mkdir(bucket)
        yield target


# ---------------------------------------------------------------------------- reference run
@dataclass
class LocalRun:
    """train_tiny.py recorded to local disk, and its ranks with Dask threads."""

    path: str
    ranks: pd.DataFrame


@pytest.fixture(scope="session")
def tiny_local(tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    import tdump

    path = str(tmp_path_factory.mktemp("local") / "run.zarr")
    ok(run([TDUMP, "record", "-o", path, *TINY_RECORD]))
    return LocalRun(path, tdump.rank(path, scheduler="threads", progress=False))


def same_ranks(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The same filters in the same order with the same scores (float64, to 1e-12)."""
    key = ["layer", "channel"]
    got, want = got.sort_values(key, ignore_index=True), want.sort_values(key, ignore_index=True)
    assert got[key].equals(want[key])
    assert (got["steps"] == want["steps"]).all()
    for col in SCORES:
        pd.testing.assert_series_equal(got[col], want[col], rtol=1e-12, atol=0)
