"""Analyze: read dumps (xarray, Trial), rank filters with Dask, check rules, without training."""

from tdump.analyze._criteria import Criterion, Plan, criteria, get_criterion, register_criterion
from tdump.analyze._open import open_dump
from tdump.analyze._rank import rank
from tdump.analyze._ranks_io import read_ranks, write_ranks
from tdump.analyze._trial import Trial, TrialTensor
from tdump.analyze._xarray import TdumpBackendEntrypoint
from tdump.analyze.rules import Firing, Rule, check, register_rule, watch

__all__: list[str] = [
    "Criterion",
    "Firing",
    "Plan",
    "Rule",
    "TdumpBackendEntrypoint",
    "Trial",
    "TrialTensor",
    "check",
    "criteria",
    "get_criterion",
    "open_dump",
    "rank",
    "read_ranks",
    "register_criterion",
    "register_rule",
    "watch",
    "write_ranks",
]
