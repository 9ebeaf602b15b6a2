"""The built-in ``accuracy_drop`` rule: accuracy from a saved scalar or from the loss inputs.

Formula and defaults: ``docs/rules.md``.
"""

from __future__ import annotations

import re

import numpy as np

from tdump.analyze._trial import Trial
from tdump.analyze.rules._base import Rule, RuleSkip, register_rule
from tdump.analyze.rules._builtin import _count, _earlier
from tdump.errors import MissingTensorError

__all__ = ["AccuracyDrop"]


@register_rule("accuracy_drop")
class AccuracyDrop(Rule):
    """Fires when accuracy falls more than ``threshold`` below ``baseline``.

    Accuracy at a step, pooled over the last ``window`` saved steps ``<= step``,
    from one source in ``mode``: a saved scalar (``scalar``; without ``scalar``,
    ``predictions`` or ``labels``: ``scalars.accuracy`` when ``mode`` stores it) as
    the mean of its values; else the loss inputs of ``mode``:
    ``sum(argmax(predictions, 1) == labels) / examples`` (``predictions > 0`` for one
    logit per example; labels given as one row per example are argmax-ed).
    ``mode=None``: ``eval`` when it has either source, else the first mode storing
    ``scalar`` (or ``scalars.accuracy``), else ``eval`` (a watcher waits for it).
    ``baseline=None``: the accuracy at the first saved step. Fires when
    ``baseline - accuracy > threshold``.
    """

    _AUTO = "scalars.accuracy"

    def __init__(
        self,
        trial: Trial,
        baseline: float | None = None,
        threshold: float = 0.05,
        window: int = 1,
        scalar: str | None = None,
        predictions: str | None = None,
        labels: str | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__(trial)
        self.baseline = None if baseline is None else float(baseline)
        self.threshold = float(threshold)
        self.window = _count("window", window)
        self.scalar: str | None = None
        self.predictions, self.labels = predictions, labels
        # no source named: the scalar where the mode has it, else its loss inputs
        self._auto = scalar is None and predictions is None and labels is None
        if scalar is not None:
            self.scalar = scalar if scalar.startswith("scalars.") else f"scalars.{scalar}"
            trial.tensor(self.scalar)  # MissingTensorError: one line
        for given in (predictions, labels):
            if given is not None:
                trial.tensor(given)  # a wrong name is a one-line error now
        self.mode = mode if mode is not None else self._default_mode()
        try:
            self._resolve()
        except MissingTensorError:
            if not self._auto:
                raise  # a source the user named is refused now, in one line
            # the dump has no accuracy to read: steps() raises it again, and a check
            # reports it for this rule while the other rules go on
        self._cache: dict[int, tuple[float, int]] = {}

    def _in_mode(self, name: str, mode: str) -> bool:
        return self.trial.has_tensor(name) and mode in self.trial.tensor(name).modes()

    def _default_mode(self) -> str:
        scalar = self.scalar or (self._AUTO if self._auto else None)
        if "eval" in self.trial.modes():
            has_scalar = scalar is not None and self._in_mode(scalar, "eval")
            if has_scalar or (self.scalar is None and self._has_loss_inputs("eval")):
                return "eval"
        if scalar is not None and self.trial.has_tensor(scalar):
            return self.trial.tensor(scalar).modes()[0]
        return "eval"

    def _has_loss_inputs(self, mode: str) -> bool:
        inputs = self.trial.tensor_names(collection="loss_inputs", mode=mode)
        return any(n.endswith(".0") and f"{n[:-2]}.1" in inputs for n in inputs)

    def _resolve(self) -> str | None:
        """The tensor whose saved steps are the rule's steps (``None``: not in the dump yet)."""
        if self.scalar is None and (self.predictions is None or self.labels is None):
            if self.mode not in self.trial.modes():
                self.tensors = ("^$",)  # nothing to read yet: a watcher waits for the mode
                return None
            if self._auto and self._in_mode(self._AUTO, str(self.mode)):
                self.scalar = self._AUTO
            else:
                self.predictions, self.labels = self._loss_inputs(self.predictions, self.labels)
        if self.scalar is not None:
            self.tensors, self.source = (f"^{re.escape(self.scalar)}$",), self.scalar
            return self.scalar
        assert self.predictions is not None and self.labels is not None
        self.tensors = (f"^{re.escape(self.predictions)}$",)
        self.source = f"{self.predictions} vs {self.labels}"
        return self.predictions

    def needed(self) -> list[str]:
        """The scalar, or the predictions (labels are read alongside)."""
        return [] if self._resolve() is None else super().needed()

    def _loss_inputs(self, predictions: str | None, labels: str | None) -> tuple[str, str]:
        inputs = self.trial.tensor_names(collection="loss_inputs", mode=self.mode)
        for name in inputs:
            head, _, arg = name.rpartition(".")
            if arg == "0" and f"{head}.1" in inputs:
                return predictions or name, labels or f"{head}.1"
        raise MissingTensorError(
            f"no loss inputs (predictions and labels) and no {self._AUTO} in mode "
            f"{self.mode!r} of {self.trial.path}; a functional loss is not captured: add "
            "tdump.capture.record_loss(loss, logits, y) after it, or "
            "tdump.report(accuracy=acc) after the evaluation (or pass --param scalar=NAME "
            "for a scalar the script saves)"
        )

    def _at(self, step: int) -> tuple[float, int]:
        """(correct or summed scalar, examples or count) at one saved step."""
        if step not in self._cache:
            if self.scalar is not None:
                self._cache[step] = (float(self.value(self.scalar, step)), 1)
            else:
                assert self.predictions is not None and self.labels is not None
                pred = self.value(self.predictions, step)
                lab = self.value(self.labels, step)
                if pred.ndim >= 2 and pred.shape[1] > 1:
                    hit = np.argmax(pred, axis=1)
                else:
                    hit = (pred.reshape(pred.shape[0], -1)[:, 0] > 0).astype(np.int64)
                if lab.ndim >= 2 and lab.shape[1] > 1:
                    lab = np.argmax(lab, axis=1)
                lab = lab.reshape(lab.shape[0], -1)[:, 0]
                self._cache[step] = (float(np.sum(hit == lab)), int(lab.shape[0]))
        return self._cache[step]

    def accuracy(self, step: int) -> float:
        """Accuracy at ``step`` pooled over the last ``window`` saved steps (see class doc)."""
        name = self._resolve()
        if name is None:
            raise RuleSkip("no data yet")
        steps = _earlier(self.trial, name, self.mode, step, self.window)
        if not steps or steps[-1] != step:
            raise RuleSkip(name)
        parts = [self._at(s) for s in steps]
        total = sum(n for _, n in parts)
        return sum(c for c, _ in parts) / total if total else float("nan")

    def invoke_at_step(self, step: int) -> bool:
        acc = self.accuracy(step)
        if self.baseline is None:
            first = self.steps()
            self.baseline = self.accuracy(first[0]) if first else acc
        drop = self.baseline - acc
        if drop > self.threshold:
            return self.fire(
                f"accuracy {acc:.4f} is {drop:.4f} below baseline {self.baseline:.4f} "
                f"(threshold {self.threshold:g}; {self.source})"
            )
        return False
