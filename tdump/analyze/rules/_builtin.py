"""The built-in rules (``accuracy_drop``: ``_accuracy.py``); formulas: ``docs/rules.md``.

Every rule here is stateless between calls: ``invoke_at_step(step)`` reads what it
needs at ``step`` (and at earlier saved steps, cached), so steps may be visited in
any order and a watcher can call it on each new step as it commits.

Examples
--------
>>> import numpy as np
>>> from tdump._format import StoreWriter
>>> from tdump.analyze import Trial
>>> w = StoreWriter.create("memory://doc/builtin.zarr")
>>> for i, g in enumerate([1.0, np.nan]):
...     w.write_tensor("train", i, "fc.weight.grad", np.full((2, 2), g, "f4"),
...                    attrs={"collection": "gradients", "kind": "parameter_grad", "module": "fc"})
...     w.commit("train", i, step=i)
>>> rule = ExplodingTensor(Trial("memory://doc/builtin.zarr"))
>>> [s for s in rule.steps() if rule.invoke_at_step(s)], rule.why
([1], 'fc.weight.grad: 4 NaN, 0 Inf')
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from tdump._dataflow import Dataflow
from tdump._modtypes import is_mean_cancelling_norm_type
from tdump.analyze._trial import Trial
from tdump.analyze.rules._base import NotEnoughSteps, Rule, RuleSkip, register_rule
from tdump.capture._config import COLLECTIONS
from tdump.errors import ConfigError, MissingTensorError, compile_regex

__all__ = [
    "DeadRelu",
    "ExplodingTensor",
    "LossNotDecreasing",
    "VanishingGradient",
    "WeightUpdateRatio",
]

#: Collections exploding_tensor reads by default (every tensor except saved scalars).
EXPLODING_COLLECTIONS = tuple(c for c in COLLECTIONS if c != "scalars")
_RELU_TYPES = ("ReLU", "ReLU6")


class _Selecting(Rule):
    """A rule reading its default collections, narrowed by an optional ``tensor_regex``.

    The regex is ANDed with the collection filter, never a replacement for it: a
    regex written to drop one layer (``^(?!conv1)``) must not pull in running stats
    or gradients that the rule would then misread as weights.
    """

    tensor_regex: str | None = None

    def _select(self, tensor_regex: str | None, collections: tuple[str, ...]) -> None:
        compile_regex(tensor_regex, "tensor regex")  # a bad regex is one line now
        self.tensor_regex = tensor_regex
        self.tensors = ()
        self.collections = collections

    def keep(self, name: str) -> bool:
        """Whether a tensor of the default collections is read (beyond ``tensor_regex``)."""
        return True

    def needed(self) -> list[str]:
        """Tensors of :attr:`collections` that :meth:`keep` keeps and ``tensor_regex`` matches."""
        pattern = compile_regex(self.tensor_regex, "tensor regex")
        return [
            n for n in super().needed() if self.keep(n) and (pattern is None or pattern.search(n))
        ]


def _positive(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {name} must be a number, got {value!r}") from None
    if not out > 0:
        raise ConfigError(f"parameter {name} must be > 0, got {value!r}")
    return out


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"parameter {name} must be a positive integer, got {value!r}")
    return value


def _listing(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _earlier(trial: Trial, name: str, mode: str | None, step: int, count: int) -> list[int]:
    """The last ``count`` saved steps of tensor ``name`` that are ``<= step``."""
    saved = [s for s in trial.tensor(name).steps(mode=mode) if s <= step]
    return saved[-count:]


def _normalised_modules(trial: Trial, mode: str | None) -> frozenset[str] | None:
    """Modules whose output feeds a BatchNorm/InstanceNorm call in ``mode``'s recorded dataflow.

    ``None`` when the dump recorded no module calls for ``mode`` (nor ``train``).
    """
    calls = trial.calls(mode or "train") or trial.calls("train")
    if not calls:
        return None
    flow = Dataflow(trial.modules, calls)
    return frozenset(flow.modules_read_by(is_mean_cancelling_norm_type))


@register_rule("vanishing_gradient")
class VanishingGradient(_Selecting):
    """Fires when a gradient's mean absolute value falls below ``threshold``.

    ``m = mean(|g|)`` over all elements of each tensor read (default: the
    ``gradients`` collection less the gradients of biases that a BatchNorm cancels,
    see ``biases``); fires when ``m < threshold`` for any of them. ``tensor_regex``
    narrows that selection.
    """

    def __init__(
        self,
        trial: Trial,
        threshold: float = 1e-7,
        tensor_regex: str | None = None,
        biases: bool | None = None,
        mode: str = "train",
    ) -> None:
        super().__init__(trial)
        self.threshold = _positive("threshold", threshold)
        if biases is not None and not isinstance(biases, bool):
            raise ConfigError(f"parameter biases must be true or false, got {biases!r}")
        self.biases = biases
        self.mode = mode
        #: Modules a norm follows (``None``: unknown, every bias left out); read once.
        self._cancelled: frozenset[str] | None = None
        self._looked = False
        self._select(tensor_regex, ("gradients",))

    def keep(self, name: str) -> bool:
        """Weights' gradients; biases' unless a BatchNorm cancels them (``biases=None``).

        Why: a conv or linear bias followed by BatchNorm gets a ~0 gradient by
        construction (BN subtracts the per-channel mean, the bias with it), so every
        healthy Conv->BN net would fire. Capture names a parameter ending in ``bias``
        a bias (collection ``biases``); its gradient is ``<name>.grad``. ``True``
        reads every bias, ``False`` none.
        """
        param = name.removesuffix(".grad")
        if not param.endswith("bias") or self.biases is True:
            return True
        if self.biases is False:
            return False
        if not self._looked:
            self._cancelled, self._looked = _normalised_modules(self.trial, self.mode), True
        module = param.rpartition(".")[0]
        return self._cancelled is not None and module not in self._cancelled

    def invoke_at_step(self, step: int) -> bool:
        low = []
        for name in self.needed():
            try:
                g = self.value(name, step)
            except RuleSkip:
                continue
            m = float(np.mean(np.abs(g, dtype=np.float64))) if g.size else 0.0
            if m < self.threshold:
                low.append((m, f"{name}: mean |g| {m:.3g}"))
        low.sort()
        return bool(low) and self.fire(
            f"{len(low)} gradient(s) below {self.threshold:g}: " + _listing([t for _, t in low])
        )


@register_rule("exploding_tensor")
class ExplodingTensor(_Selecting):
    """Fires on a NaN, an Inf, or ``max |x| > threshold`` in any tensor read.

    Reads the floating-point tensors of :data:`EXPLODING_COLLECTIONS` (those matching
    ``tensor_regex`` when given); ``threshold=None`` checks NaN and Inf only.
    """

    def __init__(
        self,
        trial: Trial,
        threshold: float | None = 1e6,
        tensor_regex: str | None = None,
        mode: str = "train",
    ) -> None:
        super().__init__(trial)
        self.threshold = None if threshold is None else _positive("threshold", threshold)
        self.mode = mode
        self._select(tensor_regex, EXPLODING_COLLECTIONS)

    def invoke_at_step(self, step: int) -> bool:
        bad = []
        for name in self.needed():
            try:
                x = self.value(name, step)
            except RuleSkip:
                continue
            if x.dtype.kind != "f" or not x.size:
                continue  # integers (labels) cannot be NaN; nothing huge to report
            nan = int(np.isnan(x).sum())
            inf = int(np.isinf(x).sum())
            finite = x[np.isfinite(x)]
            peak = float(np.abs(finite).max()) if finite.size else 0.0
            if nan or inf:
                bad.append(f"{name}: {nan} NaN, {inf} Inf")
            elif self.threshold is not None and peak > self.threshold:
                bad.append(f"{name}: max |x| {peak:.3g} > {self.threshold:g}")
        return bool(bad) and self.fire(_listing(bad))


@register_rule("dead_relu")
class DeadRelu(Rule):
    """Fires when too many channels of a ReLU layer are (almost) never active.

    Per ReLU output ``a`` (dims ``(batch, channel, ...)``) and channel ``c``:
    ``activity_c`` = fraction of non-zero values of ``a[:, c, ...]`` (``a[..., c]``
    for a channels-last tensor, ``channel_axis`` -1: a ReLU after a ViT-style
    Linear on ``(batch, tokens, features)``). A channel is
    dead when ``activity_c < inactive_threshold``; the rule fires when the fraction
    of dead channels of a layer is ``> layer_threshold``.
    """

    collections: tuple[str, ...] = ("activations",)

    def __init__(
        self,
        trial: Trial,
        inactive_threshold: float = 0.01,
        layer_threshold: float = 0.5,
        tensor_regex: str | None = None,
        mode: str = "train",
    ) -> None:
        super().__init__(trial)
        self.inactive_threshold = _positive("inactive_threshold", inactive_threshold)
        self.layer_threshold = float(layer_threshold)
        if not 0 <= self.layer_threshold < 1:
            raise ConfigError(
                f"parameter layer_threshold must be in [0, 1), got {layer_threshold!r}"
            )
        self.mode = mode
        self.tensor_regex = tensor_regex
        if tensor_regex is not None:
            self.tensors = (tensor_regex,)

    def needed(self) -> list[str]:
        """ReLU outputs: module type ReLU/ReLU6 from the dump's module tree (or ``tensor_regex``)."""
        if self.mode not in self.trial.modes():
            return []
        modules = self.trial.modules
        out = []
        for name in self.trial.tensor_names(self.tensor_regex, mode=self.mode):
            attrs = self.trial.tensor_attrs(name, str(self.mode))
            if attrs.get("kind") != "output":
                continue
            kind = str(modules.get(str(attrs.get("module")), {}).get("type", ""))
            if self.tensor_regex is not None or kind.rsplit(".", 1)[-1] in _RELU_TYPES:
                out.append(name)
        return out

    def invoke_at_step(self, step: int) -> bool:
        dead_layers = []
        for name in self.needed():
            try:
                a = self.value(name, step)
            except RuleSkip:
                continue
            if a.ndim < 2 or not a.size:
                continue
            # a channels-last Linear's (batch, tokens, features) output: features are last
            axis = (
                -1 if self.trial.tensor_attrs(name, str(self.mode)).get("channel_axis") == -1 else 1
            )
            per_channel = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
            activity = (per_channel != 0).mean(axis=1)
            dead = float((activity < self.inactive_threshold).mean())
            if dead > self.layer_threshold:
                dead_layers.append(
                    f"{name}: {dead:.0%} of {a.shape[axis]} channels dead "
                    f"(active < {self.inactive_threshold:g})"
                )
        return bool(dead_layers) and self.fire(_listing(dead_layers))


@register_rule("loss_not_decreasing")
class LossNotDecreasing(Rule):
    """Fires when the mean loss of the last ``window`` saved steps is not lower than before.

    With ``L`` the loss values (mean over elements) at the saved steps ``<= step``:
    ``prev = mean(L[-2w:-w])``, ``cur = mean(L[-w:])``; fires when
    ``prev - cur <= min_decrease * |prev|`` or either is NaN (needs ``2w`` saved steps).
    """

    collections: tuple[str, ...] = ("losses",)

    def __init__(
        self,
        trial: Trial,
        window: int = 5,
        min_decrease: float = 0.0,
        tensor: str | None = None,
        mode: str = "train",
    ) -> None:
        super().__init__(trial)
        self.window = _count("window", window)
        self.min_decrease = float(min_decrease)
        self.mode = mode
        self.tensor = tensor
        if tensor is not None:
            self.trial.tensor(tensor)  # a wrong name is a one-line error now, not later
            self.tensors = (f"^{re.escape(tensor)}$",)
            self.collections = ()
        self._cache: dict[int, float] = {}

    def steps(self) -> list[int]:
        """The saved steps holding the loss; raises when the mode has steps but no loss."""
        found = super().steps()
        no_loss = not found and self.tensor is None and self.mode in self.trial.modes()
        if no_loss and not self.needed():
            raise MissingTensorError(
                f"no loss values (collection 'losses') in mode {self.mode!r} of "
                f"{self.trial.path}; a functional loss is not captured: add "
                "tdump.capture.record_loss(loss, logits, y) after the loss line, or use "
                "a loss module (nn.CrossEntropyLoss)"
            )
        return found

    def _loss_name(self) -> str:
        names = self.needed()
        if not names:
            raise RuleSkip("no loss")
        return names[0]

    def invoke_at_step(self, step: int) -> bool:
        name = self._loss_name()
        steps = _earlier(self.trial, name, self.mode, step, 2 * self.window)
        if not steps or steps[-1] != step:
            raise RuleSkip(name)
        if len(steps) < 2 * self.window:
            # two windows not filled yet: nothing was compared, say so (not "checked")
            saved = len(self.trial.tensor(name).steps(mode=self.mode))
            fix = f": set -p window=N with N <= {saved // 2}" if saved >= 2 else ""
            raise NotEnoughSteps(
                f"needs {2 * self.window} saved steps (2 x window {self.window}) of {name} "
                f"({self.mode}), the dump has {saved}{fix}"
            )
        for s in steps:
            if s not in self._cache:
                self._cache[s] = float(np.mean(self.value(name, s), dtype=np.float64))
        values = [self._cache[s] for s in steps]
        prev = float(np.mean(values[: self.window]))
        cur = float(np.mean(values[self.window :]))
        if not prev - cur > self.min_decrease * abs(prev):  # a NaN loss is not decreasing
            return self.fire(
                f"{name}: mean over steps {steps[self.window]}..{steps[-1]} is {cur:.4g}, "
                f"over steps {steps[0]}..{steps[self.window - 1]} {prev:.4g} "
                f"(needs a decrease > {self.min_decrease:g} x {abs(prev):.4g})"
            )
        return False


@register_rule("weight_update_ratio")
class WeightUpdateRatio(_Selecting):
    """Fires when ``||w_s - w_p|| / (||w_p|| + eps)`` is ``< small`` or ``> large``.

    ``w_s`` is a weight at ``step``, ``w_p`` the same weight at its previous saved
    step (L2 norms over all elements); the first saved step has nothing to compare.
    Reads the ``weights`` collection (those matching ``tensor_regex`` when given).
    """

    def __init__(
        self,
        trial: Trial,
        small: float = 1e-8,
        large: float = 10.0,
        eps: float = 1e-9,
        tensor_regex: str | None = None,
        mode: str = "train",
    ) -> None:
        super().__init__(trial)
        self.small = float(small)
        self.large = _positive("large", large)
        self.eps = float(eps)
        self.mode = mode
        self._select(tensor_regex, ("weights",))
        self._last: tuple[str, int, np.ndarray] | None = None

    def _read(self, name: str, step: int) -> np.ndarray:
        if self._last is not None and self._last[:2] == (name, step):
            return self._last[2]
        return self.value(name, step).astype(np.float64)

    def invoke_at_step(self, step: int) -> bool:
        bad = []
        names = self.needed()
        compared = 0
        for name in names:
            steps = _earlier(self.trial, name, self.mode, step, 2)
            if len(steps) < 2 or steps[-1] != step:
                continue
            compared += 1
            prev = self._read(name, steps[0])
            cur = self.value(name, step).astype(np.float64)
            self._last = (name, step, cur)
            ratio = float(np.linalg.norm(cur - prev) / (np.linalg.norm(prev) + self.eps))
            if ratio < self.small or ratio > self.large:
                bad.append(f"{name}: ||dw||/||w|| {ratio:.3g} since step {steps[0]}")
        if not compared:
            # a step with no earlier saved weight compares nothing: not a checked step
            saved = max((len(self.trial.tensor(n).steps(mode=self.mode)) for n in names), default=0)
            raise NotEnoughSteps(
                f"needs 2 saved steps of a weight ({self.mode}), the dump has {saved}: "
                "record with a save interval that saves at least 2 steps"
            )
        return bool(bad) and self.fire(
            f"update ratio outside [{self.small:g}, {self.large:g}]: " + _listing(bad)
        )
