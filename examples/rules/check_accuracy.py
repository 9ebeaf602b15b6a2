"""The seed's ``check_accuracy`` Debugger rule, as a tdump user rule file.

Fires at an eval step whose accuracy (from the loss inputs capture stores: logits
``loss.input_0.0`` and labels ``loss.input_0.1``) is more than ``threshold`` below
``previous_accuracy`` (the last pruning round's validation accuracy)::

    tdump check run.zarr --rule examples/rules/check_accuracy.py:CheckAccuracy \\
        --param previous_accuracy=0.91 --param threshold=0.05

Add ``--watch`` to stop a run that is still training when it fires.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tdump.analyze import Rule


class CheckAccuracy(Rule):
    """Accuracy fell by more than ``threshold`` below ``previous_accuracy``."""

    mode = "eval"  # look at eval steps only
    collections = ("loss_inputs",)  # and read only the loss inputs

    def __init__(
        self,
        trial: Any,
        previous_accuracy: float = 0.0,
        threshold: float = 0.0,
        predictions: str = "loss.input_0.0",
        labels: str = "loss.input_0.1",
    ) -> None:
        super().__init__(trial)
        self.previous_accuracy = float(previous_accuracy)
        self.threshold = float(threshold)
        self.predictions = predictions
        self.labels = labels

    def invoke_at_step(self, step: int) -> bool:
        logits = self.value(self.predictions, step)  # skips steps that did not save it
        labels = self.value(self.labels, step)
        accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
        drop = self.previous_accuracy - accuracy
        if drop > self.threshold:
            return self.fire(
                f"accuracy {accuracy:.4f} fell {drop:.4f} below the previous {self.previous_accuracy:.4f}"
            )
        return False
