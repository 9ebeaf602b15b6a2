"""`tdump CMD --help` reads cleanly at 80 columns: arguments and options by metavar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from tdump.cli.app import app

from .inproc import run_main

TDUMP = str(Path(sys.executable).with_name("tdump"))
COMMANDS = sorted(c.name or "" for c in app.registered_commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_type_labels_or_braces(command: str) -> None:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    res = subprocess.run(
        [TDUMP, command, "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    text = res.stdout
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: tdump {command} [OPTIONS] "), usage
    assert "{" not in usage and "<" not in usage, usage
    # typer's own labels: <str>, <int>, <path>, <list[str]>, ... (a metavar= hides them)
    labels = re.findall(r"<(?:str|int|float|path|list\[\w+\])>", text)
    assert not labels, f"{command}: give these a metavar=: {labels}"
    assert max(len(line) for line in text.splitlines()) <= 80, text


def test_every_command_uses_the_clean_help_class() -> None:
    from tdump.cli._help import TdumpCommand

    group = typer.main.get_group(app)
    pending = list(group.commands.items())
    while pending:
        name, cmd = pending.pop()
        if hasattr(cmd, "commands"):  # a command group (tdump experiments): its commands
            pending += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
            continue
        assert isinstance(cmd, TdumpCommand), f"`tdump {name}`: pass cls=TdumpCommand"


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["rank", "{dump}", "l1"], "the criterion is an option: --criterion l1"),
        (["rank", "{dump}", "mine.parquet"], "the output is an option: --out mine.parquet"),
        (["check", "{dump}", "dead_relu"], "rules are named with --rule: tdump check DUMP"),
        (["prune", "c.pt", "ranks.parquet", "0.3"], "the fraction to remove is an option: --ratio"),
        (["prune", "c.pt", "ranks.parquet", "7"], "channels to remove is an option: --count 7"),
        (["ls", "{dump}", "extra"], None),  # no guess: click's words alone
    ],
)
def test_an_extra_positional_word_gets_the_option_it_likely_meant(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    hint: str | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    dump = str(Path(__file__).parents[2] / "sample_dumps" / "tiny.zarr")
    code, _, err = run_main(monkeypatch, capsys, *(a.format(dump=dump) for a in args))
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert last.startswith(f"Error: Got unexpected extra argument ({args[-1]})"), last
    assert (hint in last) if hint else last.endswith(f"({args[-1]})"), last
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing ran, nothing written
