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
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tdump.errors import TdumpError

__all__ = [
    "TRAIN_WINDOW",
    "dump_metrics",
    "left_alone",
    "load_round_model",
    "model_stats",
    "no_accuracy_note",
    "prunable_counts",
    "pruned_with",
    "rankable_layers",
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


def no_accuracy_note(metrics: dict[str, Any]) -> str | None:
    """The note for round 0 when its dump gives no accuracy (``None``: it has one).

    >>> no_accuracy_note({"accuracy": None})[:52]
    'round 0 has no accuracy: the script reported none an'
    >>> no_accuracy_note({"accuracy": 0.9}) is None
    True
    """
    if metrics.get("accuracy") is not None:
        return None
    return (
        "round 0 has no accuracy: the script reported none and no evaluation went "
        "through a loss module such as nn.CrossEntropyLoss, whose logits and labels "
        "capture would store; add tdump.report(accuracy=acc, loss=loss) after the "
        "script's evaluation for the table's acc and drop columns and --stop-when on them"
    )


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


def model_stats(
    model: Any, input_shape: list[int] | None, more: Sequence[tuple[Sequence[int], str]] = ()
) -> dict[str, Any]:
    """Parameters, FLOPs (``None`` without an input shape) and channels of every conv.

    ``more``: a ``forward(x, t)``'s other arguments (``recorded_more_inputs``).
    """
    from torch import nn

    from tdump.surgery import count_params, layer_flops, output_positions

    flops = None
    if input_shape:
        positions = output_positions(model, input_shape, more)
        flops = int(sum(layer_flops(model, positions).values()))
    channels = {
        n: int(m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }
    return {"params": int(count_params(model)), "flops": flops, "channels": channels}


def prunable_counts(
    model: Any,
    ranks: Any,
    *,
    scope: str = "global",
    min_channels: int = 1,
    max_ratio: float | None = None,
    conv_only_groups: bool = False,
    ignore: str | None = None,
    criterion: str | None = None,
    graph: Any = None,
) -> tuple[int, int]:
    """Channels one ``tdump prune`` of ``model`` with ``ranks`` can remove: in all, and from one group.

    ``ranks`` is what ``tdump prune`` reads (a ranks.parquet path or its DataFrame,
    whose layer names lose a wrapper's prefix as there), a ``{layer: scores}`` dict, or
    only the names of the ranked layers (a list: what they score does not change the
    numbers). The surgery's own selection (:func:`tdump.surgery.plan`) is asked for more
    channels than the ranked layers have, with these settings (those of ``tdump
    prune``, ``max_ratio=None`` its default of 0.8 for ``scope="global"``); the numbers
    are what it removes in all and from the group that loses most. With
    ``scope="per-layer"``, where ``count`` is per group, a ``count`` above the second
    number is more than any group can lose. Only the groups that selection prunes
    count: groups with ranks (a group none of whose convs is ranked keeps all its
    channels), not frozen, not residual with ``conv_only_groups``, each up to its cap
    (``min_channels``, ``max_ratio``, whole blocks of a grouped conv). ``(0, 0)`` when
    no ranked layer can be pruned (``tdump prune`` then refuses). ``graph``: ``model``'s
    channel graph (:func:`tdump.surgery.build_graph` with ``ignore``) when the caller has
    built it already; else it is built here.

    Raises
    ------
    RanksError
        Ranks that do not fit ``model`` (as ``tdump prune`` would say).

    Examples
    --------
    >>> import torchvision
    >>> m = torchvision.models.vgg11_bn()
    >>> prunable_counts(m, ["features.0", "features.4"])  # 0.8 of 64 and of 128
    (153, 102)
    >>> prunable_counts(m, ["features.0", "features.4"], scope="per-layer")  # each keeps 1
    (190, 127)
    """
    import warnings
    from collections.abc import Mapping

    import tdump.surgery as surgery
    from tdump.errors import RanksError
    from tdump.surgery._plan import select
    from tdump.surgery._prefix import strip_ranks_prefix
    from tdump.surgery._ranks import scores_for

    if isinstance(ranks, (list, tuple, set, frozenset)):
        modules = dict(model.named_modules())
        ranks = {
            name: np.zeros(_width(modules.get(name)), dtype=np.float64)
            for name in _model_names(ranks, model)
        }
    elif not isinstance(ranks, Mapping):
        if isinstance(ranks, (str, os.PathLike)):
            ranks = surgery.read_ranks_table(ranks)
        ranks = strip_ranks_prefix(ranks, model)[0]
    scores = scores_for(model, ranks, criterion)
    settings = surgery.Settings(  # what surgery.plan selects with, given these keywords
        count=sum(len(s) for s in scores.values()) + 1,  # more than are ranked
        scope=scope,
        min_channels=min_channels,
        max_ratio=max_ratio,
        conv_only_groups=conv_only_groups,
    )
    if graph is None:
        graph = surgery.build_graph(model, ignore)
    try:
        with warnings.catch_warnings():  # a nearly emptied group: the plan is not applied
            warnings.simplefilter("ignore", surgery.FewChannelsWarning)
            plan = select(graph, scores, settings)
    except RanksError:  # the scores fit: no ranked group can be pruned (or none is ranked)
        return 0, 0
    return int(plan.removed), max(plan.removed_per_group, default=0)


def left_alone(graph: Any, conv_only_groups: bool = False) -> dict[str, str]:
    """``{layer: why}`` for the convs and Linears whose output channels the surgery never removes.

    Their groups are frozen in the model's channel ``graph`` (:func:`tdump.surgery.build_graph`):
    a ViT's ``conv_proj``, whose channels meet the class token in a ``torch.cat``, or the
    classifier, whose outputs are the model's; with ``conv_only_groups`` (the loop's
    ``--conv-only-groups``) also the residual groups. Scoring them cannot prune them, so
    the loop says so instead of relaying rank's advice to record what would score them.

    Examples
    --------
    >>> import torchvision
    >>> from tdump.surgery import build_graph
    >>> left_alone(build_graph(torchvision.models.resnet18(num_classes=4)))
    {'fc': 'reaches the model output'}
    """
    found = {m: g.reason for g in graph.groups if g.frozen for m in g.members}
    if conv_only_groups:
        why = "a residual group, which --conv-only-groups leaves alone"
        found.update(
            {m: why for g in graph.groups if g.residual and not g.frozen for m in g.members}
        )
    return found


def pruned_with(
    graph: Any, ranked: Sequence[str], conv_only_groups: bool = False
) -> dict[str, list[str]]:
    """``{layer: [scored members]}`` for each layer without a score that the surgery prunes
    anyway, with the ``ranked`` layers whose output channels it shares.

    A ResNet's downsample conv gets no Taylor score (its BatchNorm output goes into the
    residual ``+``, no activation module receives it alone), but its channels are summed
    with the block's last conv's, which is scored: ``tdump prune`` removes the same
    channels from both. Recording more would only add its scores to the group's, so the
    loop says so instead of relaying rank's advice to record it. ``ranked``: the layers
    the next rank stage scores (:func:`rankable_layers`); frozen groups, and residual
    ones with ``conv_only_groups``, are :func:`left_alone`'s.

    Examples
    --------
    >>> import torch, torchvision
    >>> from tdump.surgery import build_graph
    >>> net = torchvision.models.resnet18(num_classes=4)
    >>> convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    >>> shared = pruned_with(build_graph(net), [c for c in convs if "downsample" not in c])
    >>> shared["layer2.0.downsample.0"]
    ['layer2.0.conv2', 'layer2.1.conv2']
    >>> sorted(shared)
    ['layer2.0.downsample.0', 'layer3.0.downsample.0', 'layer4.0.downsample.0']
    """
    scored = frozenset(_model_names(ranked, graph.model))
    out: dict[str, list[str]] = {}
    for group in graph.groups:
        if group.frozen or (conv_only_groups and group.residual):
            continue
        hits = [m for m in group.members if m in scored]
        if not hits:
            continue
        out.update({m: hits for m in group.members if m not in scored})
    return out


def _model_names(ranked: Iterable[str], model: Any) -> list[str]:
    """Ranked layer names as ``model`` names them: a wrapper's prefix (``model.`` of a
    LightningModule) dropped as ``tdump prune`` drops it from a ranks file."""
    import pandas as pd

    from tdump.surgery._prefix import strip_ranks_prefix

    names = pd.DataFrame({"layer": sorted(map(str, ranked))})
    return [str(n) for n in strip_ranks_prefix(names, model)[0]["layer"]]


def _width(module: Any) -> int:
    """Output channels of a conv or Linear (0 for anything else: ``scores_for`` says so)."""
    return int(getattr(module, "out_channels", None) or getattr(module, "out_features", 0) or 0)


def rankable_layers(dump: str | os.PathLike[str], criterion: str) -> list[str] | None:
    """The layers (convs, hidden Linears) the loop's rank stage scores.

    That stage is ``tdump rank DUMP --criterion CRITERION``; this is the ranker's own
    plan over the tensors ``dump`` recorded in its train steps, reading no tensor
    values: a layer whose every record holds NaN or Inf, which the ranking leaves
    out, is still listed. ``None`` when that ranking would fail (no train step,
    nothing the criterion can score: the rank stage then says why).
    """
    from tdump.analyze import scored_layers

    try:
        return scored_layers(dump, criterion)
    except TdumpError:
        return None
