"""Reading while a run writes, and runs killed with SIGKILL at random moments.

The writers are real capture hooks (``record_tiny``) in other processes. Readers must
never fail or disagree with themselves while records are being committed, and a
store killed at any moment must open with every committed record bit-identical to an
uninterrupted run (``tiny_dump``, same seeds).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tdump._format import StoreReader
from tdump.analyze import rank
from tdump.analyze._info import summarize
from tdump.errors import TdumpError

ROOT = str(Path(__file__).resolve().parents[2])

#: A process that imports torch once, then, per store, forks a recording child, waits
#: until the child has created the store, waits the given delay and SIGKILLs it (no
#: torch start-up per kill). A ``<store>.killed`` file marks each kill.
_KILLER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import torch, torch._dynamo, tdump.capture  # imported before forking (optimizers import dynamo)
from tests.reliability.conftest import record_tiny
for path, delay in zip(sys.argv[2::2], sys.argv[3::2]):
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # never outlive a failed test by long
        try:
            record_tiny(path, steps=300)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 90
    while not os.path.exists(os.path.join(path, "zarr.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(float(delay))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    open(path + ".killed", "w").close()
"""


def _same_as_reference(path: str, reference: str) -> int:
    """Check every committed record of ``path`` against ``reference``; return the count."""
    got, ref = StoreReader(path), StoreReader(reference)
    n = got.num_records("train")
    rec = got.records("train")
    assert rec["step"].tolist() == list(range(n))
    for name in got.tensor_names("train"):
        saved = got.saved_records("train", name).tolist()
        assert saved == list(range(n)), name  # every committed record holds every tensor
        for i in saved[: ref.num_records("train")]:
            np.testing.assert_array_equal(got.read("train", name, i), ref.read("train", name, i))
    return n


def _check_listing(path: str) -> int:
    info = summarize(path)
    mode = info["modes"].get("train")
    if mode is None:
        return 0
    for t in info["tensors"]:  # counts from one snapshot: never ahead of the header
        assert t["records"] == mode["records"], (t["name"], t["records"], mode["records"])
        assert t["stored_bytes"] > 0
    return int(mode["records"])


def test_read_while_writing_and_sigkills(tiny_dump: str, tmp_path: Path) -> None:
    """``ls`` and ``rank`` in a loop against a live writer, which is then SIGKILLed; then
    two more recording processes killed at random moments after their store appeared."""
    rng = random.Random(os.urandom(8))
    live = str(tmp_path / "live.zarr")
    delays = [2.5] + [rng.uniform(0.0, 1.2) for _ in range(2)]
    paths = [live] + [str(tmp_path / f"k{i}.zarr") for i in range(2)]
    argv = [x for p, d in zip(paths, delays, strict=True) for x in (p, f"{d:.3f}")]
    killer = subprocess.Popen(
        [sys.executable, "-c", _KILLER, ROOT, *argv], stderr=subprocess.PIPE, text=True
    )
    seen: list[int] = []
    ranked = 0
    try:
        while not os.path.exists(live + ".killed"):
            assert killer.poll() is None, killer.communicate()[1]
            if not os.path.exists(os.path.join(live, "zarr.json")):
                time.sleep(0.02)
                continue
            seen.append(_check_listing(live))
            if seen[-1]:
                try:
                    df = rank(live, progress=False)
                except TdumpError as exc:  # only before the first dataflow is saved
                    assert "dataflow" in str(exc), exc
                else:
                    assert df["score"].notna().all() and len(df) == 14
                    ranked += 1
        _, err = killer.communicate(timeout=120)
        assert killer.returncode == 0, err
    finally:
        if killer.poll() is None:
            killer.kill()
            killer.wait()
    assert seen == sorted(seen) and seen[-1] > 0 and ranked > 0, (seen, ranked)
    assert _same_as_reference(live, tiny_dump) >= seen[-1]
    for path, delay in zip(paths[1:], delays[1:], strict=True):
        # each store opens and holds its committed records bit for bit
        n = _same_as_reference(path, tiny_dump)
        assert _check_listing(path) == n, (path, delay)
