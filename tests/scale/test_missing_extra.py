"""An fsspec protocol whose package is not installed: one line naming the extra.

Each case runs in a fresh interpreter where ``import s3fs`` really fails
(``sys.modules["s3fs"] = None`` makes the import machinery raise ``ImportError``),
the state of a machine where ``tdump[s3]`` was not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "tests" / "capture" / "scripts" / "train_tiny.py")
NEEDLE = "error: s3:// needs the s3fs package, which is not installed; pip install 'tdump[s3]'"

# run the real console entry point after s3fs has been made unimportable
_CLI = (
    "import sys; sys.modules['s3fs'] = None; sys.argv = ['tdump', *sys.argv[1:]];"
    "from tdump.cli.app import main; main()"
)


def _without_s3fs(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "s3://bucket/run.zarr"],
        ["rank", "s3://bucket/run.zarr", "-q"],
        ["record", "-o", "s3://bucket/run.zarr", SCRIPT, "--", "--steps", "1"],
    ],
    ids=["ls", "rank", "record"],
)
def test_cli_names_the_extra(args: list[str]) -> None:
    proc = _without_s3fs(_CLI, *args)
    assert _one_error_line(proc) == NEEDLE
    assert "RESULT" not in proc.stdout  # record refused before the script ran


def test_rank_output_url_checked_before_ranking(small_dump) -> None:
    """A local dump ranked to an s3:// output fails at once, not after the ranking."""
    proc = _without_s3fs(_CLI, "rank", small_dump.path, "-q", "-o", "s3://bucket/ranks.parquet")
    assert _one_error_line(proc) == NEEDLE
    assert "ranked" not in proc.stdout


def test_library_entry_points_raise_missing_dependency() -> None:
    """open_dump, Trial, rank and Hook raise MissingDependencyError (an ImportError)."""
    code = """
import sys
sys.modules["s3fs"] = None
sys.modules["gcsfs"] = None
import tdump
from tdump._protocols import require_protocol
from tdump.errors import MissingDependencyError
calls = {
    "open_dump": lambda: tdump.open_dump("s3://bucket/run.zarr"),
    "Trial": lambda: tdump.Trial("s3://bucket/run.zarr"),
    "rank": lambda: tdump.rank("s3://bucket/run.zarr", progress=False),
    "Hook": lambda: tdump.Hook("s3://bucket/run.zarr"),
    "chained": lambda: require_protocol("simplecache::s3://bucket/run.zarr"),
    "gcs": lambda: require_protocol("gcs://bucket/run.zarr"),
}
for name, call in calls.items():
    try:
        call()
    except MissingDependencyError as exc:
        assert isinstance(exc, ImportError)
        print(name, exc)
    else:
        raise SystemExit(f"{name} did not raise")
"""
    proc = _without_s3fs(code)
    assert proc.returncode == 0, proc.stderr
    msg = "s3:// needs the s3fs package, which is not installed; pip install 'tdump[s3]'"
    assert proc.stdout.splitlines() == [
        *(f"{name} {msg}" for name in ("open_dump", "Trial", "rank", "Hook", "chained")),
        # a protocol without a tdump extra names the package fsspec needs for it
        "gcs gcs:// needs the gcsfs package, which is not installed; pip install gcsfs",
    ]
