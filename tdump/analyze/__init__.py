"""Analyze: read dumps (xarray, Trial), rank filters with Dask, check rules, without training.

Ranking (``rank``, criteria, the ranks file) loads only what it needs (numpy, zarr,
dask; pandas with the first DataFrame, which ``rank_table`` and ``tdump rank`` never
make); the readers built on xarray and dask.array (``open_dump``, ``Trial``, the
xarray backend) and the rules load on first use, so ``tdump rank`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tdump.analyze import _builtin_criteria  # noqa: F401  (registers the built-in criteria)
from tdump.analyze._criteria import Criterion, Plan, criteria, get_criterion, register_criterion
from tdump.analyze._rank import rank, rank_table, scored_layers
from tdump.analyze._ranks_io import RankTable, read_ranks, write_ranks

if TYPE_CHECKING:
    from tdump.analyze._open import open_dump
    from tdump.analyze._trial import Trial, TrialTensor
    from tdump.analyze._xarray import TdumpBackendEntrypoint
    from tdump.analyze.rules import Firing, Rule, check, register_rule, watch

__all__: list[str] = [
    "Criterion",
    "Firing",
    "Plan",
    "RankTable",
    "Rule",
    "TdumpBackendEntrypoint",
    "Trial",
    "TrialTensor",
    "check",
    "criteria",
    "get_criterion",
    "open_dump",
    "rank",
    "rank_table",
    "read_ranks",
    "register_criterion",
    "register_rule",
    "scored_layers",
    "watch",
    "write_ranks",
]

_LAZY = {
    "open_dump": "tdump.analyze._open",
    "Trial": "tdump.analyze._trial",
    "TrialTensor": "tdump.analyze._trial",
    "TdumpBackendEntrypoint": "tdump.analyze._xarray",
    "Firing": "tdump.analyze.rules",
    "Rule": "tdump.analyze.rules",
    "check": "tdump.analyze.rules",
    "register_rule": "tdump.analyze.rules",
    "watch": "tdump.analyze.rules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tdump.analyze' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too (tab completion in Jupyter calls dir()), not the typing helpers
    from tdump._lazy import public_dir

    return public_dir(__all__, globals())
