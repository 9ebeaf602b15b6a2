"""`tdump record` and the env-var entry on an unmodified script, DDP-style ranks, SIGKILL safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdump._format import StoreReader
from tdump.capture import Hook, record_loss

from .conftest import ROOT, SCRIPTS, SEED, TDUMP, load_script, run

SCRIPT = str(SCRIPTS / "train_tiny.py")


def _explicit(out: str, steps: int, functional: bool = False) -> None:
    """train_tiny.py's main(), with an explicit Hook added."""
    mod = load_script("train_tiny")
    torch.manual_seed(0)
    model = mod.TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    with Hook(out, include_regex=SEED, save_interval=2, strict=True) as hook:
        hook.register_module(model)
        hook.register_loss(crit)
        model.train()
        for _ in range(steps):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 4, (4,), generator=g)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            if functional:
                loss = F.cross_entropy(logits, y)
                record_loss(loss, logits, y)
            else:
                loss = crit(logits, y)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            model(torch.randn(3, 3, 8, 8, generator=g))


def _same_store(a: str, b: str) -> None:
    ra, rb = StoreReader(a), StoreReader(b)
    assert ra.modes() == rb.modes() == ["train", "eval"]
    for mode in ra.modes():
        assert ra.steps(mode).tolist() == rb.steps(mode).tolist()
        assert ra.tensor_names(mode) == rb.tensor_names(mode)
        for name in ra.tensor_names(mode):
            n = ra.num_records(mode)
            np.testing.assert_array_equal(
                ra.array(mode, name)[:n], rb.array(mode, name)[:n], err_msg=name
            )
    assert ra.meta()["calls"] == rb.meta()["calls"]
    ma, mb = ra.meta()["modules"], rb.meta()["modules"]
    assert ma.pop("")["type"].endswith(".TinyNet") and mb.pop("")["type"].endswith(".TinyNet")
    assert ma == mb


def test_record_captures_what_an_explicit_hook_does(tmp_path) -> None:
    out = str(tmp_path / "rec.zarr")
    proc = run([TDUMP, "record", "--out", out, "--interval", "2", SCRIPT, "--", "--steps", "5"])
    assert proc.returncode == 0, proc.stderr
    assert "RESULT" in proc.stdout and "recorded" in proc.stderr
    _explicit(str(tmp_path / "explicit.zarr"), 5)
    _same_store(out, str(tmp_path / "explicit.zarr"))
    r = StoreReader(out)
    assert r.steps("train").tolist() == [0, 2, 4] and r.steps("eval").tolist() == [0]
    assert "relu.output_1.grad" in r.tensor_names("train") and "loss.input_0.1" in r.tensor_names(
        "train"
    )


def test_functional_loss_reports_the_missing_line_once(tmp_path) -> None:
    out = str(tmp_path / "f.zarr")
    proc = run(
        [
            TDUMP,
            "record",
            "--out",
            out,
            "--interval",
            "2",
            SCRIPT,
            "--",
            "--functional",
            "--freeze-conv1",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tdump.capture.record_loss(loss, outputs, targets)") == 1
    names = StoreReader(out).tensor_names("train")
    assert "relu.output_0.grad" in names and "conv1.weight" in names
    assert "conv1.weight.grad" not in names and "loss.output_0" not in names


def test_env_var_entry_point(tmp_path) -> None:
    out = str(tmp_path / "env.zarr")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"out: {out}\nsave_interval: 3\ncompression: zstd\n")
    proc = run(
        [sys.executable, "-m", "tdump.capture.auto", SCRIPT, "--steps", "4"],
        env={"TDUMP_CONFIG": str(cfg)},
    )
    assert proc.returncode == 0, proc.stderr
    r = StoreReader(out)
    assert r.steps("train").tolist() == [0, 3]
    assert r.meta()["config"]["compression"] == "zstd"


def test_ranks_write_their_own_groups(tmp_path) -> None:
    out = str(tmp_path / "ddp.zarr")
    procs = [
        subprocess.Popen(
            [TDUMP, "record", "--out", out, "--interval", "1", SCRIPT, "--", "--steps", "3"],
            cwd=ROOT,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r = StoreReader(out)
    assert r.ranks() == [0, 1]
    for rank in (0, 1):
        assert r.steps("train", rank).tolist() == [0, 1, 2]
        assert r.meta(rank)["world_size"] == 2 and r.meta(rank)["rank"] == rank


def test_real_ddp_ranks_from_torch_distributed(tmp_path) -> None:
    out = str(tmp_path / "ddp.zarr")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    script, init = str(SCRIPTS / "train_ddp.py"), str(tmp_path / "init")
    procs = [
        subprocess.Popen(
            [TDUMP, "record", "--out", out, "-n", "1", "-i", "1|weight", script, str(r), "2", init],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r = StoreReader(out)
    assert r.ranks() == [0, 1]
    for rank in (0, 1):
        assert r.steps("train", rank).tolist() == [0, 1, 2]
        assert r.meta(rank)["world_size"] == 2
        names = r.tensor_names("train", rank)
        assert "1.output_0.grad" in names and "0.weight.grad" in names  # no "module." prefix
    # each rank saw its own batches: activations differ, weights (synchronised by DDP) agree
    a0, a1 = (r.array("train", "1.output_0", k)[0] for k in (0, 1))
    assert not np.allclose(a0, a1)
    np.testing.assert_allclose(
        r.array("train", "0.weight", 0)[2], r.array("train", "0.weight", 1)[2]
    )


KILLED = """
import sys, torch
from torch import nn
from tdump.capture import Hook
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))
hook = Hook(sys.argv[1], include_regex="1|weight", save_interval=1, strict=True)
hook.register_module(model)
step = 0
while True:
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    step += 1
"""


def test_sigkill_leaves_a_readable_store(tmp_path) -> None:
    out = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen([sys.executable, "-c", KILLED, out], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            time.sleep(0.2)
            try:
                if StoreReader(out).num_records("train") >= 5:  # reading while it writes
                    break
            except Exception:
                continue
        else:
            raise AssertionError("writer made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = StoreReader(out)
    n = r.num_records("train")
    assert n >= 5
    assert r.steps("train").tolist() == list(range(n))
    for name in ("0.weight", "1.output_0", "1.output_0.grad", "3.weight.grad"):
        assert r.saved_records("train", name).tolist() == list(range(n))
        assert not np.isnan(r.array("train", name)[:n]).any(), name


def test_explicit_hook_in_the_script_takes_precedence(tmp_path) -> None:
    auto_out, own_out = str(tmp_path / "auto.zarr"), str(tmp_path / "own.zarr")
    script = str(SCRIPTS / "train_explicit.py")
    proc = run([TDUMP, "record", "--out", auto_out, script, "--", own_out])
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(auto_out)
    r = StoreReader(own_out)
    assert r.steps("train").tolist() == [0, 1, 2]
    assert r.tensor_names("train") == ["1.output_0", "1.output_0.grad"]


def test_default_selection_finds_activation_modules_of_a_sequential(tmp_path) -> None:
    """No --include: ReLU/GELU modules named "2" and "4" are recorded, and rank scores both convs."""
    from tdump.analyze import rank

    out = str(tmp_path / "seq.zarr")
    script = str(SCRIPTS / "train_sequential.py")
    res = run([TDUMP, "record", "--out", out, "--interval", "2", script])
    assert res.returncode == 0, res.stderr
    names = StoreReader(out).tensor_names("train")
    for name in ("2.output_0", "2.output_0.grad", "4.output_0", "4.output_0.grad", "0.weight"):
        assert name in names, (name, names)
    assert not any(n.startswith(("0.output", "1.output", "5.output")) for n in names)
    ranks = rank(out, progress=False)
    assert sorted(ranks["layer"].unique()) == ["0", "3"]
    # an explicit --include is taken as it is: these activations are then not selected
    res = run([TDUMP, "record", "--out", out + "2", "-n", "2", "-i", ".*weight", script])
    assert res.returncode == 0, res.stderr
    assert not any(
        n[0].isdigit() and ".output_" in n for n in StoreReader(out + "2").tensor_names("train")
    )


def test_one_step_warning_counts_tensor_steps_not_loss_steps(tmp_path) -> None:
    """Losses saved every step (as `tdump loop` asks) do not hide tensors saved once."""
    out = str(tmp_path / "losses.zarr")
    config = '{"collections":[{"name":"losses","save_interval":1}]}'
    proc = run([TDUMP, "record", "--out", out, "--config", config, SCRIPT, "--", "--steps", "4"])
    assert proc.returncode == 0, proc.stderr
    assert StoreReader(out).steps("train").tolist() == [0, 1, 2, 3]  # loss records
    assert "holds 4 saved train step(s), 1 of them with the model's tensors" in proc.stderr
    warning = "warning: only one saved train step with the model's tensors (step 0)"
    assert warning in proc.stderr and "--interval" in proc.stderr
    out2 = str(tmp_path / "every2.zarr")
    proc = run([TDUMP, "record", "--out", out2, "--config", config, "--interval", "2", SCRIPT,
                "--", "--steps", "4"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "holds 4 saved train step(s), 2 of them with the model's tensors" in proc.stderr
    assert "warning:" not in proc.stderr
