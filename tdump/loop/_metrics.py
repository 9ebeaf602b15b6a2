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

from tdump.errors import TdumpError

__all__ = [
    "TRAIN_WINDOW",
    "dump_metrics",
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


def load_round_model(
    ckpt: str | os.PathLike[str],
    init: str | os.PathLike[str] | None,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    dump: str | os.PathLike[str] | None = None,
) -> Any:
    """The model a round's script saved, rebuilt without unpickling anything.

    A tdump checkpoint describes itself; a plain state_dict is loaded into the
    round's starting model (``init``, a tdump checkpoint of the same pruned shape),
    or into ``arch`` built with ``arch_kwargs`` for round 0, or without ``arch``
    into the registered builder that matches the model type ``dump`` recorded and
    the state_dict's shapes (as ``tdump prune`` infers it).
    """
    import tdump.surgery as surgery
    from tdump.surgery._checkpoint import load_state, read_checkpoint
    from tdump.surgery._io import dump_model_type

    sd, info = read_checkpoint(ckpt)
    # ``arch`` came from the loop's command line: trusted, and it overrides the files'
    if info.kind == "tdump" or init is None:
        model_type = None
        if arch is None and info.kind != "tdump" and dump is not None:
            try:
                model_type = dump_model_type(dump)
            except TdumpError:  # an unreadable dump only means no inference
                model_type = None
        return surgery.load(
            ckpt, arch, arch_kwargs if info.kind != "tdump" else None, model_type=model_type
        )
    model = surgery.load(init, arch)
    load_state(
        model,
        sd,
        surgery.provenance(model).arch or "the round's starting model",
        os.fspath(ckpt),
        hint=f"the script must train the pruned model the loop starts it from ({os.fspath(init)}): "
        "model = tdump.load(os.environ['TDUMP_INIT']), or {init} in TRAIN_ARGS",
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
    model: Any,
    *,
    min_channels: int = 1,
    conv_only_groups: bool = False,
    max_ratio: float | None = None,
    ignore: str | None = None,
) -> int:
    """How many channels one pruning could remove: the sum of each group's cap
    (:func:`tdump.surgery._plan.group_cap`, what ``tdump prune`` applies)."""
    from tdump.surgery import build_graph
    from tdump.surgery._plan import group_cap

    graph = build_graph(model, ignore)
    return sum(
        group_cap(grp, min_channels, max_ratio)
        for grp in graph.groups
        if not (grp.frozen or (conv_only_groups and grp.residual))
    )
