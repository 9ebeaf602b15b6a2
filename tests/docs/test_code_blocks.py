"""Every code block in README.md and docs/*.md runs as written.

Each page runs top to bottom in its own copy of a sandbox that holds what the docs
name: ``train.py`` (a plain script, tests/docs/sandbox_train.py), ``ckpt.pt`` (its
state_dict), ``dump.zarr`` (recorded from it) and ``ranks.parquet``. ``bash`` blocks
run with ``bash -euo pipefail`` and ``python`` blocks run in one namespace per page,
in order, as a reader would paste them. A block is skipped when its fence says
``fragment`` (```` ```python fragment ````) or the line before it is
``<!-- fragment -->`` (a reason may follow the word); doctest blocks (``>>>``) are left to their own tests, and
other languages (``text``, ``json``, ``yaml``) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)(.*)$")
_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str


def blocks(page: Path) -> list[Block]:
    """The runnable fenced blocks of a page, in order."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        lang, rest, start = m.group(1), m.group(2), i + 1
        j = start
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        code = "\n".join(lines[start:j])
        fragment = "fragment" in rest or (
            i > 0 and lines[i - 1].strip().startswith("<!-- fragment")
        )
        if lang in ("python", "bash", "sh", "console") and not fragment and ">>>" not in code:
            out.append(Block(page.name, start, "python" if lang == "python" else "bash", code))
        i = j + 1
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "100"
    return env


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    box = tmp_path_factory.mktemp("docs-sandbox")
    shutil.copy(Path(__file__).with_name("sandbox_train.py"), box / "train.py")
    _run([sys.executable, "train.py"], box)
    _run(
        [
            "tdump",
            "record",
            "--out",
            "dump.zarr",
            "--include",
            _INCLUDE,
            "--interval",
            "2",
            "train.py",
        ],
        box,
    )
    _run(["tdump", "rank", "dump.zarr", "-o", "ranks.parquet"], box)
    return box


_DRIVER = r"""
import json, subprocess, sys, traceback
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for b in blocks:
    where = f"{b['page']} line {b['line']}"
    if b["lang"] == "bash":
        rc = subprocess.run(["bash", "-euo", "pipefail", "-c", b["code"]]).returncode
        if rc:
            sys.exit(f"{where}: bash block exited {rc}")
    else:
        try:
            exec(compile(b["code"], where, "exec"), ns)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"{where}: python block failed")
"""


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_code_blocks_run(page: Path, sandbox: Path, tmp_path: Path) -> None:
    found = blocks(page)
    if not found:
        pytest.skip(f"{page.name} has no runnable code block")
    work = tmp_path / "work"
    shutil.copytree(sandbox, work)
    import json

    (tmp_path / "blocks.json").write_text(json.dumps([b.__dict__ for b in found]))
    (tmp_path / "driver.py").write_text(_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json")],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]


def test_fragment_markers_are_recognised(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "```python\nx = 1\n```\n<!-- fragment -->\n```python\nundefined\n```\n"
        "```bash fragment\nfalse\n```\n```text\nnot code\n```\n```python\n>>> 1\n1\n```\n"
    )
    assert [(b.lang, b.code) for b in blocks(page)] == [("python", "x = 1")]
