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
