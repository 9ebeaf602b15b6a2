"""One round's row of ``rounds.jsonl`` (docs/FORMAT.md): its size, metrics and what it did.

Examples
--------
>>> from tdump.loop._settings import LoopSettings
>>> stats = {"params": 50, "flops": None, "channels": 8}
>>> metrics = dict.fromkeys(("accuracy", "loss", "train_accuracy", "train_loss",
...     "eval_accuracy", "eval_loss", "reported", "source"))
>>> base = {"params": 100, "flops": None, "accuracy": None}
>>> row = round_row(1, LoopSettings("train.py", [], count=4), stats, metrics, base, None)
>>> row["params_ratio"], row["count"], row["checkpoint"]
(0.5, 4, 'round_001/checkpoint.pt')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tdump.loop._settings import LoopSettings

__all__ = ["round_row"]


def round_row(
    r: int,
    s: LoopSettings,
    stats: Mapping[str, Any],
    metrics: Mapping[str, Any],
    base: Mapping[str, Any] | None,
    shape: Sequence[int] | None,
    **measured: Any,
) -> dict[str, Any]:
    """Round ``r``'s row, with ratios and the accuracy drop against round 0's ``base``.

    ``stats`` is the model's size (:func:`tdump.loop._metrics.model_stats`), ``metrics``
    what its dump holds (:func:`tdump.loop._metrics.dump_metrics`); ``measured`` gives
    ``removed``, ``wall``, ``prunable``, ``prunable_per_group``, ``left_alone`` and
    ``pruned_with``.
    """
    accuracy = metrics["accuracy"]
    base_acc = base["accuracy"] if base else accuracy
    flops = stats["flops"]
    return {
        "round": r,
        "status": "done",
        "params": stats["params"],
        "flops": flops,
        "params_ratio": stats["params"] / base["params"] if base else 1.0,
        "flops_ratio": (
            flops / base["flops"]
            if base and base.get("flops") and flops is not None
            else (1.0 if flops is not None else None)
        ),
        "channels": stats["channels"],
        "input_shape": shape,
        "accuracy": accuracy,
        "loss": metrics["loss"],
        "accuracy_drop": (
            base_acc - accuracy if base_acc is not None and accuracy is not None else None
        ),
        "train_accuracy": metrics["train_accuracy"],
        "train_loss": metrics["train_loss"],
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "reported": metrics["reported"],
        "metrics_source": metrics["source"],
        "criterion": s.criterion if r > 0 else None,
        "count": s.count if r > 0 else None,
        "ratio": s.ratio if r > 0 else None,
        "removed": measured.get("removed"),
        "wall": measured.get("wall"),
        "checkpoint": f"round_{r:03d}/checkpoint.pt",
        "stop_reason": None,
        "prunable": measured.get("prunable"),
        "prunable_per_group": measured.get("prunable_per_group"),
        "left_alone": measured.get("left_alone"),
        "pruned_with": measured.get("pruned_with"),
    }
