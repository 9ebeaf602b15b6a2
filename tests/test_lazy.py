"""``dir()`` of the packages lists every public name, the lazy ones too (tab completion)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["tdump", "tdump.capture", "tdump.analyze"])
def test_dir_lists_every_public_name_before_any_is_loaded(package: str) -> None:
    """In a fresh interpreter, before any lazy name was read: ``dir()`` lists all of
    ``__all__`` (as IPython's completer would offer them) and no typing helper; and
    every name it lists resolves. Listing them imports nothing: torch stays unloaded
    (but for tdump.capture, which is the training side)."""
    code = (
        f"import importlib, json, sys; m = importlib.import_module({package!r}); "
        "d = dir(m); torch_loaded = 'torch' in sys.modules; "
        "print(json.dumps([sorted(m.__all__), d, torch_loaded, "
        "[n for n in d if not hasattr(m, n)]]))"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    names, listed, torch_loaded, unresolved = json.loads(out)
    assert set(names) <= set(listed), sorted(set(names) - set(listed))
    assert not torch_loaded or package == "tdump.capture"  # dir() loads nothing heavy
    assert not {"Any", "TYPE_CHECKING", "importlib", "annotations"} & set(listed)
    assert unresolved == []


def test_the_stages_are_attributes_of_a_plain_import() -> None:
    """``import tdump`` then ``tdump.analyze.Trial``, as in a notebook: no AttributeError,
    and the stage is imported only when read (``import tdump`` stays free of torch)."""
    code = (
        "import sys, tdump; before = 'tdump.surgery' in sys.modules; "
        "print(before, 'surgery' in dir(tdump), tdump.analyze.Trial.__name__, "
        "callable(tdump.surgery.build_graph), tdump.loop.__name__, tdump.capture.Hook.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True", "Trial", "True", "tdump.loop", "Hook"]


def test_listing_a_dump_imports_neither_xarray_nor_torch() -> None:
    """``tdump ls`` (and the summary ``tdump record`` prints) reads metadata only: the
    xarray/pandas stack and torch, seconds of imports, stay unloaded."""
    from pathlib import Path

    dump = str(Path(__file__).resolve().parents[1] / "sample_dumps" / "tiny.zarr")
    code = (
        "import sys; from tdump.analyze._info import summarize; info = summarize(sys.argv[1]); "
        "print(info['totals']['tensors'] > 0, "
        "sorted(m for m in ('xarray', 'pandas', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, dump], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "True []"
