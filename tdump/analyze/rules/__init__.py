"""Rules over dumps: conditions evaluated at each saved step, offline or while training writes.

``docs/rules.md`` has the built-ins' formulas and defaults and the ``tdump check`` command.

Examples
--------
>>> from tdump.analyze.rules import builtin_rules
>>> builtin_rules()
['accuracy_drop', 'dead_relu', 'exploding_tensor', 'loss_not_decreasing', 'vanishing_gradient', 'weight_update_ratio']
"""

from tdump.analyze.rules._accuracy import AccuracyDrop
from tdump.analyze.rules._base import (
    Firing,
    NotEnoughSteps,
    Rule,
    RuleSkip,
    builtin_rules,
    get_builtin,
    register_rule,
)
from tdump.analyze.rules._builtin import (
    DeadRelu,
    ExplodingTensor,
    LossNotDecreasing,
    VanishingGradient,
    WeightUpdateRatio,
)
from tdump.analyze.rules._check import FIRED_EXIT_CODE, Checker, check, watch
from tdump.analyze.rules._load import LoadedRule, load_rule, parse_params, split_params

__all__ = [
    "FIRED_EXIT_CODE",
    "AccuracyDrop",
    "Checker",
    "DeadRelu",
    "ExplodingTensor",
    "Firing",
    "LoadedRule",
    "LossNotDecreasing",
    "NotEnoughSteps",
    "Rule",
    "RuleSkip",
    "VanishingGradient",
    "WeightUpdateRatio",
    "builtin_rules",
    "check",
    "get_builtin",
    "load_rule",
    "parse_params",
    "register_rule",
    "split_params",
    "watch",
]
