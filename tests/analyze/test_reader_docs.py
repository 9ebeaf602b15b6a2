"""docs/reading.md: every ``>>>`` example runs against the small dump, in a fresh process.

Fresh, because what an earlier test imported must not make the page's examples pass:
a user's Jupyter kernel starts with nothing but what the page imports (the ``.tdump``
accessor once needed a module that only the test session had loaded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reading.md"

RUN = """
import doctest, json, sys
sys.path.insert(0, sys.argv[2])
from tests.conftest import write_small_dump
write_small_dump("run.zarr")
r = doctest.testfile(sys.argv[1], module_relative=False,
                     optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
print(json.dumps({"attempted": r.attempted, "failed": r.failed}))
"""


def test_reading_md_examples(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(DOC), str(ROOT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["attempted"] > 30
    assert result["failed"] == 0, proc.stdout[-3000:]
