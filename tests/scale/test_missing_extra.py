"""An fsspec protocol whose package is not installed: one line naming the extra.

Each case runs in a fresh interpreter where ``import s3fs`` really fails
(``sys.modules["s3fs"] = None`` makes the import machinery raise ``ImportError``),
the state of a machine where ``tdump[s3]`` was not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "tests" / "capture" / "scripts" / "train_tiny.py")
NEEDLE = "error: s3:// needs the s3fs package, which is not installed; pip install 'tdump[s3]'"

# the real console entry point, once per argument list, in one interpreter; each
# command's stderr follows a marker line
_CLI = """
import json, sys
sys.modules["s3fs"] = None
from tdump.cli.app import main
for args in json.loads(sys.argv[1]):
    print("@@", args[0], file=sys.stderr, flush=True)
    sys.argv = ["tdump", *args]
    try:
        main()
    except SystemExit as exc:
        print("@@ exit", exc.code, file=sys.stderr, flush=True)
    else:
        print("@@ exit 0", file=sys.stderr, flush=True)
"""


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


def test_cli_names_the_extra(small_dump) -> None:
    """ls, rank, record, and rank of a local dump to an s3:// output: one line each."""
    cases = [
        ["ls", "s3://bucket/run.zarr"],
        ["rank", "s3://bucket/run.zarr", "-q"],
        ["record", "-o", "s3://bucket/run.zarr", SCRIPT, "--", "--steps", "1"],
        # the output URL is checked before the ranking, not after it
        ["rank", small_dump.path, "-q", "-o", "s3://bucket/ranks.parquet"],
    ]
    proc = _without_s3fs(_CLI, json.dumps(cases))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing ranked, the script never ran (it prints RESULT)
    parts = proc.stderr.split("@@ ")[1:]
    assert len(parts) == 2 * len(cases), proc.stderr
    for i, case in enumerate(cases):
        head, *lines = [ln for ln in parts[2 * i].splitlines() if ln.strip()]
        assert head == case[0] and lines == [NEEDLE], (case, proc.stderr)
        assert parts[2 * i + 1].strip() == "exit 1", (case, proc.stderr)


def test_library_entry_points_raise_missing_dependency() -> None:
    """open_dump, Trial and rank raise MissingDependencyError (an ImportError).

    (``tdump.Hook`` runs the same check as `tdump record`, tested above, before writing.)
    """
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
        *(f"{name} {msg}" for name in ("open_dump", "Trial", "rank", "chained")),
        # a protocol without a tdump extra names the package fsspec needs for it
        "gcs gcs:// needs the gcsfs package, which is not installed; pip install gcsfs",
    ]
