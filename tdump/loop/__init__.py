"""The iterative pruning loop as one command, tracked as an experiment (docs/loop.md).

Examples
--------
>>> from tdump.loop import LoopSettings, parse_stop
>>> parse_stop("accuracy_drop > 0.10").evaluate({"accuracy_drop": 0.2})
True
>>> LoopSettings("train.py", rounds=4, count=200).criterion
'taylor'
"""

from tdump.loop._experiment import EXPERIMENT_FORMAT, EXPERIMENT_VERSION, Experiment
from tdump.loop._expr import STOP_NAMES, StopCondition, parse_stop
from tdump.loop._loop import LoopEvents, run_loop
from tdump.loop._metrics import dump_metrics
from tdump.loop._settings import RECORD_CONFIG, STOP_CHECKS, LoopSettings, register_stop_check

__all__ = [
    "EXPERIMENT_FORMAT",
    "EXPERIMENT_VERSION",
    "RECORD_CONFIG",
    "STOP_CHECKS",
    "STOP_NAMES",
    "Experiment",
    "LoopEvents",
    "LoopSettings",
    "StopCondition",
    "dump_metrics",
    "parse_stop",
    "register_stop_check",
    "run_loop",
]
