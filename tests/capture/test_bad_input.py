"""Bad hook settings and a file that is not a training script: one line, no traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tdump.capture import CollectionConfig, Hook, HookConfig, load_config, run_script
from tdump.errors import ConfigError, SelectionError

from .conftest import SCRIPTS, TDUMP, run

SCRIPT = str(SCRIPTS / "train_tiny.py")


def _one_line_error(proc: object, out: Path, message: str) -> None:
    err = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode != 0, err  # type: ignore[attr-defined]
    assert "Traceback" not in err and "File " not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert not out.exists()  # refused before the script ran


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"save_steps": "abc"}', "save_steps must be a list of steps (integers >= 0"),
        ('{"save_steps": [-1, 3]}', "save_steps must hold steps >= 0 (steps count from 0), not -1"),
        ('{"start_step": "a"}', "start_step must be an integer, not 'a'"),
        ('{"mode_save_interval": 5}', "mode_save_interval must map modes to intervals"),
        ("[1,2]", "hook config '[1,2]' is JSON, but a list, not an object of settings"),
    ],
)
def test_record_refuses_bad_config_in_one_line(tmp_path: Path, config: str, message: str) -> None:
    out = tmp_path / "d.zarr"
    proc = run([TDUMP, "record", "--out", str(out), "--config", config, SCRIPT])
    _one_line_error(proc, out, message)


def test_record_refuses_a_checkpoint_as_the_script(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    torch.save(nn.Linear(2, 2).state_dict(), ckpt)  # a zip archive: runpy would try it
    out = tmp_path / "d.zarr"
    proc = run([TDUMP, "record", "--out", str(out), str(ckpt)])
    _one_line_error(proc, out, f"{ckpt} is not a Python script but a zip archive")
    raw = tmp_path / "weights.bin"
    raw.write_bytes(np.arange(64, dtype="f4").tobytes())
    with pytest.raises(ConfigError, match="is not a Python script but a binary file"):
        run_script(str(raw), [], HookConfig(out=str(out)))
    latin = tmp_path / "notes.py"
    latin.write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not a Python script: it is not text"):
        run_script(str(latin), [], HookConfig(out=str(out)))
    assert not out.exists()


def test_script_syntax_error_shows_the_users_lines_only(tmp_path: Path, capfd) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import torch\nx = (\n")
    assert run_script(str(script), [], HookConfig(out=str(tmp_path / "d.zarr"))) == 1
    err = capfd.readouterr().err
    assert f'File "{script}", line 2' in err and "SyntaxError: '(' was never closed" in err
    # as `python broken.py` prints it: no frames of tdump or runpy
    assert "Traceback" not in err and "_record.py" not in err and "runpy" not in err, err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"save_steps": "abc"}, r"save_steps must be a list of steps \(integers >= 0"),
        ({"save_steps": 3}, r"save_steps must be a list of steps"),
        ({"save_steps": [1.5]}, r"save_steps must hold integer steps, not 1\.5"),
        ({"save_steps": [3, -1]}, r"save_steps must hold steps >= 0 .*not -1"),
        ({"start_step": "a"}, r"start_step must be an integer, not 'a'"),
        ({"start_step": -2}, r"start_step must be >= 0, not -2"),
        ({"start_step": 5, "end_step": 5}, r"end_step \(5\) must be greater than start_step \(5\)"),
        ({"save_interval": True}, r"save_interval must be a positive integer, not True"),
        ({"mode_save_interval": 5}, r"mode_save_interval must map modes to intervals"),
        ({"mode_save_interval": {"test": 1}}, r"unknown mode in mode_save_interval 'test'"),
        (
            {"mode_save_interval": {"eval": 0}},
            r"mode_save_interval\['eval'\] must be a positive integer, not 0",
        ),
        ({"compression": "zstd:x"}, r"the level of zstd must be an integer from 0 to 9, not 'x'"),
        ({"compression": "auto:3"}, r"auto takes no level"),
        ({"compression": 3}, r"compression must be a string"),
        ({"queue_size": "2"}, r"queue_size must be a positive integer, not '2'"),
        ({"strict": "yes"}, r"strict must be true or false, not 'yes'"),
        ({"storage_dtype": "int8"}, r"unknown storage_dtype 'int8'; use one of float16, bfloat16"),
        ({"out": 5}, r"out must be a store path or URL \(a string or os.PathLike.*\), not 5"),
        ({"rank": 2, "world_size": 2}, r"rank \(2\) must be below world_size \(2\)"),
        ({"exclude_regex": 1}, r"exclude_regex must be a regex \(a string\) or null, not 1"),
        ({"collections": {"activations": 5}}, r"the settings of 'activations' must be a mapping"),
        ({"collections": [{"name": "losses", "every": 1}]}, r"unknown setting\(s\) every in"),
        ({"collections": [{"save_interval": 1}]}, r"has no name; add one of weights"),
        ({"collections": {"losses": {"save_steps": [-3]}}}, r"save_steps of collection losses"),
        ({"collections": {"losses": {"enabled": "no"}}}, r"enabled of collection losses must be"),
        (
            {"collections": [{"name": "losses"}, {"name": "losses", "save_interval": 2}]},
            r"collections name losses more than once",
        ),
    ],
)
def test_hook_config_names_field_given_and_expected(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        HookConfig.from_dict(settings)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        Hook(**settings) if "out" not in settings else HookConfig(**settings)


def test_good_settings_are_normalized() -> None:
    cfg = HookConfig(
        save_steps=np.array([0, 5]), start_step=np.int64(0), mode_save_interval={"eval": 1}
    )
    assert cfg.save_steps == (0, 5) and type(cfg.save_steps[0]) is int
    assert type(cfg.start_step) is int
    assert HookConfig.from_dict(cfg.to_dict()) == cfg
    with Hook("memory://t/norm.zarr", save_steps=range(0, 10, 5)) as hook:
        assert hook.config.save_steps == (0, 5)
    assert HookConfig(compression="zstd-plain:3").compression == "zstd-plain:3"
    assert CollectionConfig("losses", save_steps=[2]).save_steps == (2,)
    with pytest.raises(SelectionError, match="invalid include_regex of collection losses"):
        CollectionConfig("losses", include_regex="(")


def test_config_text_that_is_json_but_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'\[1,2\]' is JSON, but a list, not an object"):
        load_config("[1,2]")
    with pytest.raises(ConfigError, match="'5' is JSON, but a number"):
        load_config("5")
    with pytest.raises(ConfigError, match=r"config file nope\.yaml not found"):
        load_config("nope.yaml")
    listed = tmp_path / "hook.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="holds a list, not a mapping of settings"):
        load_config(str(listed))
