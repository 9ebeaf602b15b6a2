"""What the loop measures each round: metrics from the round's dump, size of its model.

Metrics come, in this order of preference, from

1. scalars the script reported with ``tdump.report(accuracy=..., loss=...)`` (mode
   ``global``; the last report of each name wins);
2. the loss inputs capture stores (logits and labels of a module loss such as
   ``nn.CrossEntropyLoss``): ``eval_accuracy``/``eval_loss`` over the eval records
   saved after the last train record (the last evaluation pass), and
   ``train_accuracy``/``train_loss`` over the last :data:`TRAIN_WINDOW` saved train
   records.

``accuracy`` is the reported one, else ``eval_accuracy``; ``loss`` likewise.

Examples
--------
>>> dump_metrics("round_000/dump.zarr")  # doctest: +SKIP
{'accuracy': 0.91, 'loss': 0.27, 'eval_accuracy': 0.9, ..., 'source': 'report'}
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "TRAIN_WINDOW",
    "dump_metrics",
    "infer_input_shape",
    "load_round_model",
    "model_stats",
    "prunable_channels",
]

#: Saved train records (the most recent) that train accuracy and loss average over.
TRAIN_WINDOW = 20


def _loss_metrics(trial: Any, mode: str, rows: np.ndarray) -> dict[str, float]:
    """Accuracy and loss over records ``rows`` of ``mode`` from the stored loss inputs."""
    out: dict[str, float] = {}
    names = trial.tensor_names(collection="loss_inputs", mode=mode)
    logits_names = [n for n in names if n.endswith(".input_0.0")]
    if not logits_names:
        return out
    base = logits_names[0][: -len(".input_0.0")]
    labels_name, loss_name = f"{base}.input_0.1", f"{base}.output_0"
    steps = set(int(s) for s in trial.records(mode)["step"][rows])
    correct = total = 0
    losses: list[tuple[float, int]] = []
    logits_t = trial.tensor(logits_names[0])
    for step in sorted(steps & set(logits_t.steps(mode))):
        logits = logits_t.value(step, mode)
        if names and labels_name in names:
            labels = trial.tensor(labels_name).value(step, mode)
            if logits.ndim == 2 and labels.ndim == 1 and labels.dtype.kind in "iu":
                correct += int((logits.argmax(1) == labels).sum())
                total += int(labels.size)
        if trial.has_tensor(loss_name):
            try:
                value = float(trial.tensor(loss_name).value(step, mode))
            except Exception:  # not saved at this step
                continue
            losses.append((value, int(logits.shape[0]) if logits.ndim else 1))
    if total:
        out[f"{mode}_accuracy"] = correct / total
    if losses:
        weights = sum(w for _, w in losses)
        out[f"{mode}_loss"] = sum(v * w for v, w in losses) / max(weights, 1)
    return out


def dump_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metrics of one round from its dump (see the module docstring).

    Returns a dict with ``accuracy``, ``loss`` (``None`` when neither source has
    them), ``train_accuracy``, ``train_loss``, ``eval_accuracy``, ``eval_loss``,
    ``reported`` (every reported scalar, last value) and ``source``
    (``"report"``, ``"loss inputs"`` or ``None``).
    """
    from tdump.analyze import Trial

    trial = Trial(path)
    modes = trial.modes()
    reported: dict[str, float] = {}
    if "global" in modes:
        for name in trial.tensor_names(collection="scalars", mode="global"):
            series = trial.scalar(name, mode="global")
            if series:
                reported[name.removeprefix("scalars.")] = float(series[max(series)])
    derived: dict[str, float] = {}
    last_train = -np.inf
    if "train" in modes:
        rec = trial.records("train")
        last_train = float(np.nanmax(rec["time"])) if rec["time"].size else -np.inf
        rows = np.arange(len(rec["step"]))[-TRAIN_WINDOW:]
        derived.update(_loss_metrics(trial, "train", rows))
    if "eval" in modes:
        rec = trial.records("eval")
        rows = np.flatnonzero(rec["time"] >= last_train)
        if not rows.size:  # evaluated only before training ended: take them all
            rows = np.arange(len(rec["step"]))
        derived.update(_loss_metrics(trial, "eval", rows))
    accuracy = reported.get("accuracy", derived.get("eval_accuracy"))
    loss = reported.get("loss", derived.get("eval_loss"))
    source = (
        "report" if "accuracy" in reported else ("loss inputs" if accuracy is not None else None)
    )
    return {
        "accuracy": accuracy,
        "loss": loss,
        "train_accuracy": reported.get("train_accuracy", derived.get("train_accuracy")),
        "train_loss": reported.get("train_loss", derived.get("train_loss")),
        "eval_accuracy": reported.get("eval_accuracy", derived.get("eval_accuracy")),
        "eval_loss": reported.get("eval_loss", derived.get("eval_loss")),
        "reported": reported,
        "source": source,
    }


def infer_input_shape(path: str | os.PathLike[str]) -> list[int] | None:
    """The model's input shape (batch excluded) from the dump's dataflow, if it shows one.

    Taken from the first conv that reads the model's input: its output size, stride,
    padding and kernel give the smallest input of the same output size (FLOPs only
    depend on output sizes).
    """
    from tdump.analyze import Trial

    trial = Trial(path)
    modules = trial.modules
    for call in trial.calls("train"):
        if call.get("inputs") != ["<input>"]:
            continue
        cfg = (modules.get(call.get("module", "")) or {}).get("config") or {}
        shape = call.get("shape") or []
        if "kernel_size" not in cfg or len(shape) < 3:
            return None
        dims = len(shape) - 2
        k = _per_dim(cfg.get("kernel_size"), dims, 1)
        s = _per_dim(cfg.get("stride"), dims, 1)
        p = _per_dim(cfg.get("padding"), dims, 0)
        spatial = [
            (o - 1) * st - 2 * pd + kk for o, st, pd, kk in zip(shape[2:], s, p, k, strict=True)
        ]
        return [int(cfg.get("in_channels", 3)), *spatial]
    return None


def _per_dim(value: Any, dims: int, default: int) -> list[int]:
    if value is None or isinstance(value, str):
        return [default] * dims
    if isinstance(value, (int, float)):
        return [int(value)] * dims
    return [int(v) for v in value]


def load_round_model(
    ckpt: str | os.PathLike[str],
    init: str | os.PathLike[str] | None,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
) -> Any:
    """The model a round's script saved, rebuilt without unpickling anything.

    A tdump checkpoint describes itself; a plain state_dict is loaded into the
    round's starting model (``init``, a tdump checkpoint of the same pruned shape),
    or into ``arch`` built with ``arch_kwargs`` for round 0.
    """
    import tdump.surgery as surgery
    from tdump.surgery._checkpoint import load_state, read_checkpoint

    sd, info = read_checkpoint(ckpt)
    if info.kind == "tdump" or init is None:
        return surgery.load(ckpt, arch if info.kind != "tdump" else None, arch_kwargs)
    model = surgery.load(init)
    load_state(
        model, sd, surgery.provenance(model).arch or "the round's starting model", os.fspath(ckpt)
    )
    return model


def model_stats(model: Any, input_shape: list[int] | None) -> dict[str, Any]:
    """Parameters, FLOPs (``None`` without an input shape) and channels of every conv."""
    from torch import nn

    from tdump.surgery import count_params, layer_flops, output_positions

    flops = None
    if input_shape:
        flops = int(sum(layer_flops(model, output_positions(model, input_shape)).values()))
    channels = {
        n: int(m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }
    return {"params": int(count_params(model)), "flops": flops, "channels": channels}


def prunable_channels(
    model: Any, *, min_channels: int = 1, conv_only_groups: bool = False, ignore: str | None = None
) -> int:
    """How many channels pruning could still remove (each group keeps ``min_channels``)."""
    from tdump.surgery import build_graph

    graph = build_graph(model, ignore)
    total = 0
    for grp in graph.groups:
        if grp.frozen or (conv_only_groups and grp.residual):
            continue
        total += max(0, grp.size - max(min_channels, grp.blocks))
    return total
