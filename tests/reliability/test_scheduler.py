"""`--scheduler` addresses that are no Dask scheduler: one line at once, or within --timeout."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tdump.analyze import rank
from tests.reliability.conftest import one_line_error


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("bogus://host:8786", "unknown scheduler address scheme 'bogus'"),
        ("tcp://", "names no host"),
        ("tls://127.0.0.1:8786", "needs TLS certificates"),
        ("tcp://127.0.0.1:1", "cannot reach the Dask scheduler"),
    ],
)
def test_bad_address_at_once(
    address: str, says: str, tiny_dump: str, tmp_path: Path, run_cli: Any
) -> None:
    start = time.monotonic()
    out = tmp_path / "r.parquet"
    line = one_line_error(run_cli("rank", tiny_dump, "-o", str(out), "--scheduler", address))
    assert says in line and time.monotonic() - start < 5
    assert not out.exists()


@pytest.fixture
def http_port() -> Iterator[int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_server_is_named(tiny_dump: str, http_port: int, run_cli: Any) -> None:
    """The dashboard-port mistake: hung forever before; now one line within --timeout."""
    start = time.monotonic()
    address = f"tcp://127.0.0.1:{http_port}"
    line = one_line_error(run_cli("rank", tiny_dump, "--scheduler", address, "--timeout", "1"))
    assert "an HTTP server answers" in line and "HTTP/1.0 200" in line and "8787" in line
    assert time.monotonic() - start < 10


def test_real_scheduler_address_still_works(tiny_dump: str) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, processes=False, protocol="tcp", dashboard_address=":0"
    ) as cluster:
        df = rank(tiny_dump, scheduler=cluster.scheduler_address, progress=False)
    ref = rank(tiny_dump, scheduler="sync", progress=False)
    assert df["score"].tolist() == ref["score"].tolist()
