"""docs/rules.md: every ``>>>`` example runs against the small dump of docs/reading.md."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from tests.conftest import write_small_dump

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


def test_rules_md_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_small_dump("run.zarr")
    result = doctest.testfile(
        str(DOC),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted >= 7
    assert result.failed == 0
