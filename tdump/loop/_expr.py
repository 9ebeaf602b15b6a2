"""``--stop-when``: a small, safe expression language over a round's metrics.

Parsed with :mod:`ast` and evaluated by walking the tree; only comparisons, ``and``,
``or``, ``not``, parentheses, numbers and the names in :data:`STOP_NAMES` are
allowed, so nothing a user types is ever executed as code.

Examples
--------
>>> cond = parse_stop("accuracy_drop > 0.10 or params_ratio < 0.2")
>>> cond.evaluate({"accuracy_drop": 0.02, "params_ratio": 0.5})
False
>>> cond.evaluate({"accuracy_drop": 0.12, "params_ratio": 0.5})
True
>>> sorted(cond.names)
['accuracy_drop', 'params_ratio']
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tdump.errors import ConfigError

__all__ = ["STOP_NAMES", "StopCondition", "parse_stop"]

#: Names a stop condition may use, and what they mean (docs/loop.md).
STOP_NAMES: dict[str, str] = {
    "accuracy": "the round's accuracy (reported, else eval accuracy from the loss inputs)",
    "accuracy_drop": "round 0's accuracy minus this round's (0.02 = two points lost)",
    "params_ratio": "parameters of this round's model / round 0's",
    "flops_ratio": "FLOPs of this round's model / round 0's",
    "loss": "the round's loss (reported, else eval loss)",
    "round": "the round number (0 = the starting model)",
}

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


@dataclass(frozen=True)
class StopCondition:
    """A parsed ``--stop-when`` expression (build it with :func:`parse_stop`)."""

    text: str
    tree: ast.Expression = field(repr=False, compare=False)
    names: frozenset[str] = frozenset()

    def evaluate(self, values: Mapping[str, float | None]) -> bool:
        """True when the condition holds for ``values`` (a missing name is a ConfigError)."""
        return bool(_eval(self.tree.body, values, self.text))


def _check(node: ast.AST, text: str, names: set[str]) -> None:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
        for v in node.values:
            _check(v, text, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, text, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if not isinstance(node.operand, ast.Constant):
            raise ConfigError(f"--stop-when {text!r}: a sign may only precede a number")
        _check(node.operand, text, names)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise ConfigError(
                    f"--stop-when {text!r}: only <, <=, >, >=, ==, != compare; got {type(op).__name__}"
                )
        for v in (node.left, *node.comparators):
            _check(v, text, names)
    elif isinstance(node, ast.Name):
        if node.id not in STOP_NAMES:
            raise ConfigError(
                f"--stop-when {text!r}: unknown name {node.id!r}; use {', '.join(STOP_NAMES)}"
            )
        names.add(node.id)
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ConfigError(f"--stop-when {text!r}: {node.value!r} is not a number")
    else:
        raise ConfigError(
            f"--stop-when {text!r}: {type(node).__name__} is not allowed; write comparisons "
            "joined by and/or, e.g. 'accuracy_drop > 0.10 or params_ratio < 0.2'"
        )


def parse_stop(text: str) -> StopCondition:
    """Parse a stop expression; a one-line :class:`ConfigError` says what is wrong.

    Examples
    --------
    >>> parse_stop("__import__('os')")
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: --stop-when "__import__('os')": Call is not allowed; write comparisons joined by and/or, e.g. 'accuracy_drop > 0.10 or params_ratio < 0.2'
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(
            f"--stop-when {text!r} is not an expression ({exc.msg}); e.g. 'accuracy_drop > 0.10'"
        ) from None
    names: set[str] = set()
    _check(tree.body, text, names)
    if not isinstance(tree.body, (ast.Compare, ast.BoolOp, ast.UnaryOp)) or (
        isinstance(tree.body, ast.UnaryOp) and not isinstance(tree.body.op, ast.Not)
    ):
        raise ConfigError(
            f"--stop-when {text!r} is not a condition; compare a name, e.g. 'accuracy < 0.8'"
        )
    return StopCondition(text, tree, frozenset(names))


def _eval(node: ast.AST, values: Mapping[str, float | None], text: str) -> Any:
    if isinstance(node, ast.BoolOp):
        results = (_eval(v, values, text) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        inner = _eval(node.operand, values, text)
        if isinstance(node.op, ast.Not):
            return not inner
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values, text)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _eval(right_node, values, text)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        value = values.get(node.id)
        if value is None:
            raise ConfigError(
                f"--stop-when {text!r} needs {node.id}, which this round does not have; "
                "report it with tdump.report(accuracy=..., loss=...) in the training script"
            )
        return value
    assert isinstance(node, ast.Constant)
    return node.value
