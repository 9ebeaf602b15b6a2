"""tdump: tensor capture out of the training loop.

Record regex-selected tensors from a PyTorch run into a Zarr store, rank conv
filters from that store with Dask on CPUs, and rewrite checkpoints without the
weakest filters. The three stages talk only through documented files
(``docs/FORMAT.md``).

Heavy modules (torch, dask, xarray) load on first use, so ``import tdump`` is cheap.

Examples
--------
>>> import tdump
>>> tdump.__version__
'0.1.0'
"""

from __future__ import annotations

import importlib
from typing import Any

from tdump._version import __version__
from tdump.errors import TdumpError

__all__ = [
    "Hook",
    "TdumpError",
    "Trial",
    "__version__",
    "load",
    "open_dump",
    "prune",
    "rank",
    "report",
]

_LAZY = {
    "Hook": "tdump.capture",
    "open_dump": "tdump.analyze",
    "Trial": "tdump.analyze",
    "rank": "tdump.analyze",
    "prune": "tdump.surgery",
    "load": "tdump.surgery",
    "report": "tdump.capture._report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tdump' has no attribute {name!r}")
