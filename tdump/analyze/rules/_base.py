"""The rule interface: :class:`Rule`, what a firing is, and the built-in registry.

A rule has the shape smdebug users know: ``__init__(self, trial, **params)`` and
``invoke_at_step(self, step) -> bool`` (``True``: the condition holds at ``step``),
with ``self.trial`` a :class:`~tdump.analyze.Trial`. Subclasses of :class:`Rule`
also say which mode's steps they look at (:attr:`Rule.mode`) and which tensors they
read (:attr:`Rule.tensors` / :attr:`Rule.collections`), so the checker visits only
the steps where those tensors hold data and reads nothing else; :meth:`Rule.fire`
records why a firing happened.

Examples
--------
>>> import numpy as np
>>> from tdump._format import StoreWriter
>>> from tdump.analyze import Trial
>>> w = StoreWriter.create("memory://doc/rule.zarr")
>>> for i, loss in enumerate([1.0, 0.5, 7.0]):
...     w.write_tensor("train", i, "loss.output_0", np.asarray(loss, "f4"),
...                    attrs={"collection": "losses", "kind": "loss", "module": "loss"})
...     w.commit("train", i, step=10 * i)
>>> class LossAbove(Rule):
...     collections = ("losses",)
...     def __init__(self, trial, limit=5.0):
...         super().__init__(trial)
...         self.limit = limit
...     def invoke_at_step(self, step):
...         loss = float(self.value("loss.output_0", step))
...         return loss > self.limit and self.fire(f"loss {loss:g} > {self.limit:g}")
>>> rule = LossAbove(Trial("memory://doc/rule.zarr"))
>>> [s for s in rule.steps() if rule.invoke_at_step(s)], rule.why
([20], 'loss 7 > 5')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from tdump.analyze._trial import Trial
from tdump.errors import ConfigError, MissingTensorError, compile_regex

__all__ = [
    "Firing",
    "NotEnoughSteps",
    "Rule",
    "RuleSkip",
    "builtin_rules",
    "get_builtin",
    "register_rule",
]

_REGISTRY: dict[str, type[Rule]] = {}
_R = TypeVar("_R", bound="type[Rule]")


class RuleSkip(Exception):
    """Raised inside ``invoke_at_step``: the data this rule needs is not at this step.

    The checker skips the step silently (smdebug's ``TensorUnavailableForStep``);
    a skipped step does not count as checked.
    """


class NotEnoughSteps(RuleSkip):
    """Raised inside ``invoke_at_step``: the rule needs more saved steps than it has so far.

    The message says what it needs and how to change that (``needs 10 saved steps
    (2 x window 5), the dump has 8 ...: set -p window=N``); when a rule checked no
    step at all, ``tdump check`` shows the last such message instead of a count.
    """


@dataclass(frozen=True)
class Firing:
    """One step at which a rule fired, or at which it failed.

    Attributes
    ----------
    rule
        The rule's name as given (built-in name or class name).
    step
        The step (of ``mode``) at which the condition held.
    mode
        The mode whose step it is (``None`` for a rule over every mode's steps).
    why
        What held, in words (from :meth:`Rule.fire`), or the error.
    error
        ``True`` when the rule raised at this step instead of answering; the rule is
        then not invoked again, the other rules go on.
    """

    rule: str
    step: int
    mode: str | None
    why: str
    error: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the ``--json`` output's firing entries)."""
        return asdict(self)


class Rule:
    """Base class of rules (built-in and user).

    Parameters
    ----------
    trial
        The dump, opened as a :class:`~tdump.analyze.Trial`.

    Attributes
    ----------
    name
        Registry name (set by :func:`register_rule`); user rules are named by class.
    mode
        Mode whose steps :meth:`steps` lists (``None``: every mode's steps, merged).
    tensors
        Regexes (``re.search``) of tensor names the rule reads; with
        :attr:`collections`, decides which steps are visited (:meth:`needed`).
    collections
        Collections the rule reads (``weights``, ``gradients``, ``losses`` ...).
    why
        Why the last firing happened (set by :meth:`fire`).
    """

    name: ClassVar[str] = ""
    mode: str | None = "train"
    tensors: tuple[str, ...] = ()
    collections: tuple[str, ...] = ()

    def __init__(self, trial: Trial, **params: Any) -> None:
        if params:
            raise ConfigError(f"unknown parameter(s) {', '.join(sorted(params))} for this rule")
        self.trial = trial
        self.why = ""

    def invoke_at_step(self, step: int) -> bool:
        """Whether the condition holds at ``step`` (override)."""
        raise NotImplementedError

    def fire(self, why: str) -> bool:
        """Record why the rule fires and return ``True`` (``return cond and self.fire(...)``)."""
        self.why = why
        return True

    # -- what the rule reads
    def needed(self) -> list[str]:
        """Tensor names of :attr:`mode` matching :attr:`tensors` or :attr:`collections`.

        Empty when the rule declares neither (it then visits every step of its mode).
        """
        if not (self.tensors or self.collections):
            return []
        mode = self.mode if self.mode in self.trial.modes() else None
        if self.mode is not None and mode is None:
            return []
        patterns = [p for p in (compile_regex(t, "tensor regex") for t in self.tensors) if p]
        out = []
        for name in self.trial.tensor_names(mode=mode):
            by_name = any(p.search(name) for p in patterns)
            if by_name or (self.collections and self._collection(name) in self.collections):
                out.append(name)
        return out

    def _collection(self, name: str) -> str:
        return self.trial.tensor(name).collection

    def steps(self) -> list[int]:
        """Steps to invoke the rule at: those of :attr:`mode` where a needed tensor has data."""
        if self.mode is not None and self.mode not in self.trial.modes():
            return []
        names = self.needed()
        if not names:
            if self.tensors or self.collections:
                return []
            return self.trial.steps(self.mode)
        found: set[int] = set()
        for name in names:
            found.update(self.trial.tensor(name).steps(mode=self.mode))
        return sorted(found)

    def value(self, name: str, step: int) -> np.ndarray:
        """Tensor ``name`` at ``step`` of :attr:`mode` as numpy.

        Raises
        ------
        RuleSkip
            The tensor exists but holds no value at ``step`` (the step is skipped).
        MissingTensorError
            No tensor called ``name`` (a mistake in the rule: reported).
        """
        tensor = self.trial.tensor(name)
        if self.mode is not None and self.mode not in tensor.modes():
            raise RuleSkip(name)
        try:
            return tensor.value(step, mode=self.mode)
        except MissingTensorError:
            raise RuleSkip(name) from None


def register_rule(name: str) -> Callable[[_R], _R]:
    """Class decorator registering a built-in :class:`Rule` under ``name``.

    >>> @register_rule("always")
    ... class Always(Rule):
    ...     def invoke_at_step(self, step):
    ...         return self.fire("always")
    >>> "always" in builtin_rules()
    True
    >>> _ = _REGISTRY.pop("always")
    """

    def deco(cls: _R) -> _R:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def builtin_rules() -> list[str]:
    """Names of the built-in rules, sorted."""
    return sorted(_REGISTRY)


def get_builtin(name: str) -> type[Rule]:
    """The built-in rule class called ``name``.

    Raises
    ------
    ConfigError
        No such built-in; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown rule {name!r}; built-in rules: {', '.join(builtin_rules())} "
            "(or give FILE.py:CLASS)"
        ) from None
