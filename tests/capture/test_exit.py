"""The end of a run: exit flush without close, SIGTERM/SIGINT, a stop request (exit 75)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tdump._control import STOPPED_EXIT_CODE, read_stop_request, write_stop_request
from tdump._format import StoreReader
from tdump.capture import Hook, TrainingStopped
from tests.procs import default_sigint

from .conftest import ROOT, SCRIPTS, TDUMP

AUTO_SCRIPT = """import tdump.capture.auto  # first line: capture from TDUMP_CONFIG
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()
for _ in range(6):
    opt.zero_grad()
    loss_fn(model(torch.randn(8, 3, 32, 32)), torch.tensor([0, 1] * 4)).backward()
    opt.step()
"""


def _popen(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def test_queued_records_are_committed_at_exit(tmp_path) -> None:
    """A Hook the script never closes, and `import tdump.capture.auto` (run side by side)."""
    script = tmp_path / "train_auto.py"
    script.write_text(AUTO_SCRIPT)
    outs = {way: str(tmp_path / f"{way}.zarr") for way in ("hook", "auto")}
    procs = {
        "hook": _popen([sys.executable, str(SCRIPTS / "train_noclose.py"), outs["hook"]]),
        "auto": _popen(
            [sys.executable, str(script)],
            env={"TDUMP_CONFIG": f'{{"out": "{outs["auto"]}", "save_interval": 1}}'},
        ),
    }
    for way, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "switched off" not in err, err
        assert StoreReader(outs[way]).steps("train").tolist() == [0, 1, 2, 3, 4, 5], way


def _start(out: str) -> subprocess.Popen[str]:
    script = str(SCRIPTS / "train_forever.py")
    # faulthandler: a run that outlives the test is aborted with every thread's stack shown
    args = [TDUMP, "record", "-o", out, "-n", "1", "-i", ".*", script]
    return _popen(args, env={"PYTHONFAULTHANDLER": "1"})


def _wait_records(proc: subprocess.Popen[str], out: str, n: int) -> int:
    """Read STEP lines until the dump holds ``n`` committed records; the last step seen."""
    assert proc.stdout is not None
    deadline = time.time() + 90
    for line in proc.stdout:
        step = int(line.split()[1])
        try:
            if StoreReader(out).num_records("train") >= n:
                return step
        except Exception:  # not created yet
            pass
        assert time.time() < deadline, "training made no progress"
    raise AssertionError(f"training ended early: {proc.stderr.read() if proc.stderr else ''}")


def _check_dump(out: str, at_least: int) -> int:
    r = StoreReader(out)
    n = r.num_records("train")
    assert n >= at_least
    assert r.steps("train").tolist() == list(range(n))
    for name in ("0.weight", "1.output_0"):
        assert r.saved_records("train", name).tolist() == list(range(n)), name
    # a signal may land inside the last step's backward; every earlier record is whole
    for name in ("0.weight.grad", "1.output_0.grad"):
        assert r.saved_records("train", name).tolist()[: n - 1] == list(range(n - 1)), name
    assert not list(Path(out).rglob("*.partial"))
    return n


def _finish(proc: subprocess.Popen[str], case: str) -> tuple[str, str]:
    """``communicate`` with a timeout whose failure shows what the process last said."""
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        tail = out.splitlines()[-3:]
        raise AssertionError(
            f"{case}: still running 60 s later; stdout {tail}, stderr:\n{err[-6000:]}"
        ) from None


def test_signals_and_stop_request_under_record(tmp_path) -> None:
    """A stop request -> 75, SIGTERM -> 143, SIGINT -> 130; each commits what is queued."""
    cases = {"stop": (None, 75), "SIGTERM": (signal.SIGTERM, 143), "SIGINT": (signal.SIGINT, 130)}
    outs = {k: str(tmp_path / f"{k}.zarr") for k in cases}
    procs = {k: _start(outs[k]) for k in cases}  # side by side: one start-up's wait
    try:
        at_request = 0
        for k, (sig, _) in cases.items():
            _wait_records(procs[k], outs[k], 3)
            if sig is None:
                write_stop_request(outs[k], "test stop", requested_by="test")
                at_request = StoreReader(outs[k]).num_records("train")
            else:
                procs[k].send_signal(sig)
        results = {k: _finish(procs[k], k) for k in cases}
    finally:
        for p in procs.values():
            p.kill()
    for k, (_, code) in cases.items():
        rest, err = results[k]
        assert procs[k].returncode == code, (k, err)
        assert "Traceback" not in err, err
        assert "saved train step(s)" in err, err  # the summary
        n = _check_dump(outs[k], 3)
        last = max([0, *(int(x.split()[1]) for x in rest.splitlines() if x.startswith("STEP"))])
        assert n >= last - 1, k  # every finished step committed (interval 1)
    assert "tdump: SIGTERM received" in results["SIGTERM"][1]
    assert "tdump: interrupted (SIGINT)" in results["SIGINT"][1]
    assert "stop requested by test (test stop)" in results["stop"][1]
    n_stop = StoreReader(outs["stop"]).num_records("train")
    assert n_stop - at_request <= 5  # stopped within a few steps of the request
    assert STOPPED_EXIT_CODE == 75


def test_training_stopped_is_catchable_and_the_store_is_closed(tmp_path) -> None:
    out = str(tmp_path / "d.zarr")
    model = nn.Linear(3, 2)
    hook = Hook(out, include_regex="weight", save_interval=2, strict=True)
    hook.register_module(model)
    for _ in range(3):
        model(torch.randn(2, 3)).sum().backward()
    hook.flush()
    write_stop_request(out, "enough", step=2)
    with pytest.raises(TrainingStopped) as info:
        for _ in range(10):
            model(torch.randn(2, 3)).sum().backward()
    err = info.value
    assert err.code == STOPPED_EXIT_CODE and isinstance(err, SystemExit) and err.request is not None
    assert err.request.reason == "enough"
    assert hook._closed and not model._forward_pre_hooks  # closed, detached
    assert StoreReader(out).steps("train").tolist() == [0, 2]  # step 4 began after the request
    # appending clears the old request: the next run is not stopped by it
    Hook(out, include_regex="weight", write_mode="append").close()
    assert read_stop_request(out) is None


def test_sigterm_in_a_script_with_a_hook(tmp_path) -> None:
    """The hook's own SIGTERM handler: SystemExit(143) in the main thread, records committed."""
    from tdump.capture._exit import Terminated, _on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out = str(tmp_path / "t.zarr")
    model = nn.Linear(3, 2)
    try:
        with (
            pytest.raises(Terminated) as info,
            Hook(out, include_regex="weight", save_interval=1) as hook,
        ):
            hook.register_module(model)
            assert signal.getsignal(signal.SIGTERM) is _on_sigterm
            for step in range(100):
                model(torch.randn(2, 3)).sum().backward()
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        from tdump.capture import _exit

        _exit._exiting.clear()  # this process goes on (pytest)
    assert info.value.code == 143
    assert StoreReader(out).steps("train").tolist() == [0, 1, 2, 3]


def test_stop_polling_is_cheap(tmp_path, monkeypatch) -> None:
    """Unsaved steps read no file: the request is looked for at saved steps and every 2 s."""
    from tdump.capture import _lifecycle

    reads: list[str] = []

    def counting(url: str, **kw: object) -> object:
        reads.append(url)
        return read_stop_request(url)

    monkeypatch.setattr(_lifecycle, "read_stop_request", counting)
    model = nn.Linear(3, 2)
    start = time.monotonic()
    with Hook(str(tmp_path / "p.zarr"), include_regex="weight", save_interval=100) as hook:
        hook.register_module(model)
        for _ in range(250):
            model(torch.randn(2, 3))
    polls_by_time = int((time.monotonic() - start) / 2.0) + 1
    assert 3 <= len(reads) <= 3 + polls_by_time  # saved steps 0, 100, 200 (+ timed polls)


def test_forked_children_neither_capture_nor_close(tmp_path) -> None:
    """DataLoader workers, a forked trainer and a SIGTERMed fork, under record and a Hook.

    Every child is forked after the writer thread started; its exit runs threading's
    exit hooks, where the parent's hooks used to close (and fail on a writer thread the
    child does not have), and the forked trainer's steps used to reach the copied hook.
    """
    script = str(SCRIPTS / "train_workers.py")
    outs = {way: str(tmp_path / f"{way}.zarr") for way in ("record", "hook")}
    children = ["--train-in-child", "--term-child"]
    procs = {
        "record": _popen([TDUMP, "record", "-o", outs["record"], "-n", "1", script, *children]),
        "hook": _popen([sys.executable, script, "--hook", outs["hook"], *children]),
    }
    for way, proc in procs.items():
        out, err = _finish(proc, way)
        assert proc.returncode == 0, err
        lines = [ln for ln in err.splitlines() if ln.startswith("tdump:")]
        assert all(
            ln.startswith(("tdump: capturing", "tdump: recorded", "tdump: " + outs[way]))
            for ln in lines
        ), err
        # the trainer finished its steps; SIGTERM ended the other as it ends any process
        assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("CHILD")] == ["0", "-15"]
        r = StoreReader(outs[way])
        assert r.steps("train").tolist() == list(range(12)), way  # 3 epochs x 4 batches, no more
        assert r.read("train", "0.weight.grad", 11).shape == (8, 1, 3, 3)
