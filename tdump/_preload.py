"""Import modules on a background thread while the caller does other work.

Why: ``tdump rank`` needs dask only once it has planned, and pyarrow only to write
its result, yet each costs 0.1-0.3 s to import on a cold page cache, most of it
waiting on the disk. Started first, the import overlaps zarr's import, the planning
and the reading (which release the GIL), and the later ``import`` finds it done. A failed
import is left for the real import to report; the thread is not a daemon, so the
interpreter never shuts down halfway through an import.

Examples
--------
>>> import sys
>>> thread = preload("json", "not_a_module_xyz")
>>> thread.join()
>>> "json" in sys.modules, "not_a_module_xyz" in sys.modules
(True, False)
"""

from __future__ import annotations

import importlib
import sys
import threading

__all__ = ["preload"]


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            continue


def preload(*names: str) -> threading.Thread:
    """Start importing ``names`` (in order) on a thread; return it (already started).

    Modules already imported are skipped without a thread doing any work.
    """
    missing = tuple(n for n in names if n not in sys.modules)
    thread = threading.Thread(target=_import_all, args=(missing,), name="tdump-preload")
    thread.start()
    return thread
