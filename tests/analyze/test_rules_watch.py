"""watch(): follow a dump while a writer appends to it; stop request at the first bad step."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tdump._control import read_stop_request
from tdump._format import StoreWriter
from tdump.analyze import watch
from tdump.errors import ConfigError, DumpNotFoundError
from tests.analyze.rules_helpers import append, tensor, write

BAD = 12


def _loss(step: int) -> dict:
    value = np.float32("nan") if step >= BAD else np.float32(1.0 / (step + 1))
    return {"loss.output_0": tensor("losses", value, "loss")}


def _train(w: StoreWriter, url: str, out: list[int], start: int = 1) -> None:
    """A writer that commits a step every 10 ms and stops once it finds a stop request."""
    for step in range(start, 300):
        append(w, "train", step, _loss(step))
        if read_stop_request(url) is not None:
            out.append(step)
            return
        time.sleep(0.01)


def test_watch_memory_url_stops_at_the_first_bad_step() -> None:
    url = f"memory://rules/{uuid.uuid4().hex}/live.zarr"
    w = write(url, {"train": [(0, _loss(0))]})
    stopped: list[int] = []
    writer = threading.Thread(target=_train, args=(w, url, stopped))
    writer.start()
    try:
        firings = watch(url, ["exploding_tensor"], poll=0.02, timeout=20)
    finally:
        writer.join(30)
    assert [(f.rule, f.step, f.error) for f in firings] == [("exploding_tensor", BAD, False)]
    req = read_stop_request(url)
    assert req is not None and req.step == BAD and req.requested_by == "tdump check --watch"
    assert (
        req.reason
        == f"rule exploding_tensor fired at step {BAD} (train): loss.output_0: 1 NaN, 0 Inf"
    )
    # the writer saw the request a few steps after the bad one (commit + poll latency)
    assert stopped and BAD <= stopped[0] <= BAD + 25, stopped


def test_watch_without_stop_and_until_step(tmp_path: Path) -> None:
    path = str(tmp_path / "done.zarr")
    write(path, {"train": [(s, _loss(s)) for s in range(BAD + 3)]})
    firings = watch(path, ["exploding_tensor"], poll=0.01, timeout=5, stop=False)
    assert [f.step for f in firings] == [BAD] and read_stop_request(path) is None
    # a healthy prefix: nothing fires, the watch ends at --until-step without waiting
    healthy = str(tmp_path / "healthy.zarr")
    write(healthy, {"train": [(s, _loss(s)) for s in range(BAD)]})
    t0 = time.monotonic()
    assert watch(healthy, ["exploding_tensor"], poll=0.01, timeout=30, until_step=BAD - 1) == []
    assert time.monotonic() - t0 < 10 and read_stop_request(healthy) is None


def test_watch_idle_timeout_and_evaluated_counts(tmp_path: Path) -> None:
    path = str(tmp_path / "idle.zarr")
    write(path, {"train": [(s, _loss(s)) for s in range(5)]})
    seen: dict[str, int] = {}
    t0 = time.monotonic()
    assert watch(path, ["exploding_tensor"], poll=0.05, timeout=0.3, evaluated=seen) == []
    assert 0.3 <= time.monotonic() - t0 < 10
    assert seen == {"exploding_tensor": 5}


def test_watch_refuses_bad_rules_before_the_dump_exists(tmp_path: Path) -> None:
    later = str(tmp_path / "later.zarr")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        watch(later, ["nope"], timeout=30)
    with pytest.raises(ConfigError, match="--param x: no rule given takes it"):
        watch(later, ["dead_relu"], params={"x": 1}, timeout=30)
    assert time.monotonic() - t0 < 5  # refused at once, not after waiting for the dump
    with pytest.raises(DumpNotFoundError):  # a dump that never appears: gives up after timeout
        watch(str(tmp_path / "never.zarr"), ["dead_relu"], poll=0.05, timeout=0.2)
