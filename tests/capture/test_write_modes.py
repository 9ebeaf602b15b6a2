"""An existing dump: refused by default, continued with append, replaced with overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tdump._format import StoreReader
from tdump.capture import Hook, HookConfig, run_script
from tdump.errors import ConfigError

from .conftest import SCRIPTS

SCRIPT = str(SCRIPTS / "train_traced.py")


def _record(out: str, **settings: object) -> int:
    cfg = HookConfig.from_dict({"out": out, "save_interval": 1, "include_regex": ".*", **settings})
    return run_script(SCRIPT, [], cfg)


def _files(path: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def test_existing_dump_is_refused_before_training(tmp_path) -> None:
    out = str(tmp_path / "d.zarr")
    assert _record(out) == 0
    before = _files(out)
    marker = tmp_path / "ran"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = HookConfig(out=out, include_regex=".*")
    with pytest.raises(ConfigError, match=r"already holds a dump .*--append.*--overwrite"):
        run_script(str(script), [], cfg)
    assert not marker.exists()  # refused before the script ran
    with pytest.raises(ConfigError, match="already holds a dump"):
        Hook(out, include_regex=".*")
    assert _files(out) == before


def test_append_continues_steps_and_cleans_partials(tmp_path) -> None:
    out = str(tmp_path / "d.zarr")
    assert _record(out) == 0
    first = StoreReader(out).array("train", "block.0.weight")[:3]
    stale = Path(out, "rank0/train/tensors/block.0.weight/c.9.0.0.0.0.abc.partial")
    stale.write_bytes(b"half")
    assert _record(out, write_mode="append") == 0
    r = StoreReader(out)
    assert r.steps("train").tolist() == [0, 1, 2, 3, 4, 5]
    assert r.meta()["next_steps"]["train"] == 6
    w = r.array("train", "block.0.weight")[:6]
    np.testing.assert_array_equal(w[:3], first)  # the first run's records are intact
    np.testing.assert_array_equal(w[3:], first)  # the same seeded script, appended as 3..5
    assert not stale.exists()


def test_append_refuses_another_model(tmp_path) -> None:
    out = str(tmp_path / "d.zarr")
    assert _record(out) == 0
    before = _files(out)
    hook = Hook(out, include_regex=".*", write_mode="append")
    other = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(ConfigError, match=r"cannot append .* another model \(9 difference"):
        hook.register_module(other)
    hook.close()
    assert _files(out) == before


def test_overwrite_replaces(tmp_path) -> None:
    out = str(tmp_path / "d.zarr")
    with Hook(out, include_regex=".*", save_interval=1, strict=True) as hook:
        m = nn.Linear(3, 2)
        hook.register_module(m)
        for _ in range(5):
            m(torch.randn(2, 3))
    assert StoreReader(out).steps("train").tolist() == [0, 1, 2, 3, 4]
    assert _record(out, write_mode="overwrite") == 0
    r = StoreReader(out)
    assert r.steps("train").tolist() == [0, 1, 2]
    assert "weight" not in r.tensor_names("train") and "block.0.weight" in r.tensor_names("train")
    assert not os.path.exists(os.path.join(out, "rank0", "train", "tensors", "weight"))


def test_summary_counts_steps_and_warns_on_one(tmp_path, capfd) -> None:
    out = str(tmp_path / "one.zarr")
    cfg = HookConfig(out=out, include_regex=".*")  # interval 100 on a 3-step script
    assert run_script(SCRIPT, [], cfg) == 0
    err = capfd.readouterr().err
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    assert f"holds 1 saved train step(s), {size / 1e6:.1f} MB" in err
    assert "warning: only one saved train step (step 0)" in err and "--interval" in err
    assert _record(str(tmp_path / "many.zarr")) == 0
    err = capfd.readouterr().err
    assert "holds 3 saved train step(s)" in err and "warning" not in err


@pytest.mark.parametrize("version", [2, 1])
def test_append_forgets_a_killed_writers_uncommitted_record(
    tmp_path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """A writer killed after writing tensor ``a`` of record 2 but before committing it:
    the next writer's record 2 holds only ``b``, and readers must not see the stale ``a``."""
    import tdump._format as fmt

    monkeypatch.setattr(fmt, "FORMAT_VERSION", version)
    out = str(tmp_path / "d.zarr")
    w = fmt.StoreWriter.create(out)
    for rec in range(2):
        for name in ("a", "b"):
            w.write_tensor("train", rec, name, np.full(3, rec, "f4"))
        w.commit("train", rec, step=rec)
    w.write_tensor("train", 2, "a", np.full(3, 99, "f4"))  # killed here: never committed
    assert StoreReader(out).saved_records("train", "a").tolist() == [0, 1]

    w = fmt.StoreWriter.create(out, mode="append")
    w.write_tensor("train", 2, "b", np.full(3, 2, "f4"))
    w.commit("train", 2, step=2)
    r = StoreReader(out)
    assert r.root.attrs["tdump"]["format_version"] == version
    assert r.saved_records("train", "a").tolist() == [0, 1]
    assert r.saved_records("train", "b").tolist() == [0, 1, 2]
    assert np.isnan(r.read("train", "a", 2)).all() and r.read("train", "b", 2).tolist() == [2] * 3
    assert sorted(r.record_sizes("train", "a")) == [0, 1]


def test_appended_reports_continue_the_global_steps(tmp_path: Path) -> None:
    """`tdump record --append` of a script that calls tdump.report: global steps go on."""
    script = tmp_path / "reporting.py"
    script.write_text(
        f"exec(open({str(SCRIPT)!r}).read())\n"
        "import sys, tdump\n"
        "tdump.report(accuracy=float(sys.argv[1]))\n"
        "tdump.report(accuracy=float(sys.argv[1]) + 0.5)\n"
    )
    out = str(tmp_path / "d.zarr")
    for run, mode in enumerate(("create", "append", "append")):
        cfg = HookConfig(out=out, include_regex=".*weight", save_interval=1, write_mode=mode)
        assert run_script(str(script), [str(run)], cfg) == 0
    r = StoreReader(out)  # validates: steps of every mode increase
    assert r.steps("global").tolist() == [0, 1, 2, 3, 4, 5]
    assert r.steps("train").tolist() == list(range(9))
    accuracy = r.array("global", "scalars.accuracy")[:6]
    np.testing.assert_array_equal(accuracy, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])


def test_one_step_warning_says_untrained_only_at_step_0(tmp_path, capfd) -> None:
    cfg = HookConfig(out=str(tmp_path / "three.zarr"), include_regex=".*", save_steps=[2])
    assert run_script(SCRIPT, [], cfg) == 0
    err = capfd.readouterr().err
    assert "warning: only one saved train step (step 2), so ranking sees the model at" in err
    assert "untrained" not in err
    assert run_script(SCRIPT, [], cfg.replace(out=str(tmp_path / "zero.zarr"), save_steps=[0])) == 0
    assert "(step 0), so ranking sees the model at that one step (at step 0: untrained)" in (
        capfd.readouterr().err
    )
