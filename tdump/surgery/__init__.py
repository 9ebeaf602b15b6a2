"""Surgery: checkpoint + ranks -> smaller checkpoint, via a torch.fx dependency graph.

:func:`prune` removes the lowest-ranked conv filters and everything coupled to them
(BatchNorm entries, consumers' input channels, residual partners, concatenation
slices, depthwise convs); :func:`save` writes a pickle-free checkpoint and
:func:`load` rebuilds the model from it. See docs/surgery.md.

Examples
--------
>>> import torch, torchvision, tdump.surgery as surgery
>>> model = torchvision.models.resnet18(num_classes=10)
>>> ranks = {"layer1.0.conv1": torch.arange(64.0).numpy()}
>>> pruned, plan = surgery.prune(model, ranks, count=16)
>>> pruned.layer1[0].conv1.out_channels, plan.layers["layer1.0.conv1"].keep[:3]
(48, [16, 17, 18])
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tdump.errors import CheckpointError, ConfigError
from tdump.surgery._aggregate import register_aggregation
from tdump.surgery._apply import apply_keeps, single_threaded
from tdump.surgery._checkpoint import build_arch, load_state, read_checkpoint, write_checkpoint
from tdump.surgery._graph import ChannelGraph, Group, build_graph
from tdump.surgery._plan import (
    FewChannelsWarning,
    LayerPlan,
    Plan,
    Settings,
    keeps_for,
    select,
)
from tdump.surgery._ranks import RanksLike, read_ranks_table, scores_for
from tdump.surgery._stats import count_params, layer_flops, layer_params, output_positions

__all__ = [
    "ChannelGraph",
    "FewChannelsWarning",
    "Group",
    "LayerPlan",
    "Plan",
    "Provenance",
    "apply",
    "build_arch",
    "build_graph",
    "count_params",
    "layer_flops",
    "layer_params",
    "load",
    "output_positions",
    "plan",
    "provenance",
    "prune",
    "read_ranks_table",
    "register_aggregation",
    "save",
]

_ATTR = "_tdump_provenance"


@dataclass
class Provenance:
    """Where a model came from: set by :func:`load` and :func:`prune`, read by :func:`save`.

    ``plan`` is cumulative: kept indices relative to the architecture's original channels.
    """

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    rounds: int = 0
    ignore: str | None = None


def provenance(model: nn.Module) -> Provenance:
    """The model's :class:`Provenance` (an empty one for a model tdump did not load or prune)."""
    prov = model.__dict__.get(_ATTR)
    return prov if isinstance(prov, Provenance) else Provenance()


def plan(
    model: nn.Module,
    ranks: RanksLike,
    *,
    count: int | None = None,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 1,
    max_ratio: float | None = None,
    round_to: int | None = None,
    ignore: str | None = None,
    conv_only_groups: bool = False,
    criterion: str | None = None,
    aggregate: str = "mean",
    normalize: str = "mean",
) -> Plan:
    """Choose what :func:`prune` would remove, without touching ``model``.

    Parameters are those of :func:`prune`.

    Examples
    --------
    >>> import numpy as np, torchvision
    >>> p = plan(torchvision.models.vgg11_bn(), {"features.0": np.arange(64.0)}, ratio=0.25, scope="per-layer")
    >>> len(p.layers["features.0"].keep)
    48
    """
    settings = Settings(
        count,
        ratio,
        scope,
        min_channels,
        max_ratio,
        round_to,
        conv_only_groups,
        aggregate,
        normalize,
    )
    settings.check()
    graph = build_graph(model, ignore)
    return select(graph, scores_for(model, ranks, criterion), settings)


def prune(
    model: nn.Module,
    ranks: RanksLike,
    *,
    count: int | None = None,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 1,
    max_ratio: float | None = None,
    round_to: int | None = None,
    ignore: str | None = None,
    conv_only_groups: bool = False,
    criterion: str | None = None,
    aggregate: str = "mean",
    normalize: str = "mean",
    inplace: bool = False,
) -> tuple[nn.Module, Plan]:
    """Remove the lowest-ranked output channels of convs, and everything coupled to them.

    Parameters
    ----------
    model : nn.Module
        A model torch.fx can trace (see ``ignore``).
    ranks : path, DataFrame or dict
        ``ranks.parquet`` (tdump.ranks v1), its DataFrame, or ``{conv: scores}``.
        Higher score = more important; a table's raw ``score`` is used (see ``normalize``).
    count, ratio : int or float
        Exactly one: channels to remove (a coupled group's channel counts once), or
        the fraction of candidate channels (per group with ``scope="per-layer"``).
    scope : {"global", "per-layer"}
        Rank all groups together, or prune each group by itself.
    min_channels : int
        Every group keeps at least this many channels.
    max_ratio : float, optional
        At most this fraction of any one group is removed (a real cap); with
        ``scope="global"`` it defaults to 0.8 (``max_ratio=1.0`` lifts it).
    round_to : int, optional
        Kept counts are rounded up to multiples of this (hardware-friendly).
    ignore : str, optional
        Regex of module paths to leave alone (also keeps untraceable modules whole).
    conv_only_groups : bool
        Leave residual groups (convs coupled through additions) alone.
    criterion : str, optional
        Which criterion of a multi-criterion ranks table to use.
    aggregate : str
        How a group's members' scores combine (:func:`register_aggregation`).
    normalize : {"mean", "rms", "l2", "none"}
        Each layer's scores are divided by their mean absolute value (``mean``), their
        root mean square, their L2 norm (width-biased: wide layers look weak) or
        nothing, before groups are aggregated and ranked; the same for a ranks file
        (its raw ``score``) and a dict.
    inplace : bool
        Rewrite ``model`` itself instead of a deep copy.

    Returns
    -------
    (nn.Module, Plan)
        The pruned model and what was removed (replay it with :func:`apply`).

    Raises
    ------
    RanksError, ConfigError, UntraceableModelError

    Examples
    --------
    >>> import numpy as np, torchvision
    >>> m = torchvision.models.mobilenet_v2()
    >>> small, p = prune(m, {"features.1.conv.0.0": np.arange(32.0)}, ratio=0.5, scope="per-layer")
    >>> small.features[1].conv[0][0].groups
    16
    """
    settings = Settings(
        count,
        ratio,
        scope,
        min_channels,
        max_ratio,
        round_to,
        conv_only_groups,
        aggregate,
        normalize,
    )
    settings.check()
    scores = scores_for(model, ranks, criterion)
    if inplace:
        target = model
    else:
        with single_threaded():
            target = copy.deepcopy(model)
    graph = build_graph(target, ignore)
    p = select(graph, scores, settings)
    apply_keeps(target, graph, keeps_for(graph, p))
    prev = provenance(model)
    target.__dict__[_ATTR] = Provenance(
        prev.arch,
        dict(prev.arch_kwargs),
        prev.plan.compose(p),
        prev.rounds + 1,
        ignore or prev.ignore,
    )
    return target, p


def apply(
    model: nn.Module, plan: Plan, *, ignore: str | None = None, inplace: bool = False
) -> nn.Module:
    """Replay ``plan`` (from :func:`prune`, :func:`plan` or :meth:`Plan.load`) on ``model``.

    Examples
    --------
    >>> import numpy as np, torchvision, tdump.surgery as surgery
    >>> m = torchvision.models.resnet18()
    >>> p = surgery.plan(m, {"layer1.0.conv1": np.arange(64.0)}, count=8)
    >>> apply(m, p).layer1[0].conv1.out_channels
    56
    """
    target = model if inplace else copy.deepcopy(model)
    graph = build_graph(target, ignore)
    apply_keeps(target, graph, keeps_for(graph, plan))
    prev = provenance(model)
    target.__dict__[_ATTR] = Provenance(
        prev.arch,
        dict(prev.arch_kwargs),
        prev.plan.compose(plan),
        prev.rounds + 1,
        ignore or prev.ignore,
    )
    return target


def load(
    path: str | os.PathLike[str],
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    ignore: str | None = None,
) -> nn.Module:
    """Rebuild a model from a checkpoint (weights only; nothing is unpickled).

    A tdump checkpoint names its architecture; a plain state_dict (or a dict holding
    one under ``state_dict``/``model``) needs ``arch`` unless the dict has an ``arch``
    entry. The model remembers its :class:`Provenance` so :func:`prune` and
    :func:`save` compose rounds.

    Raises
    ------
    CheckpointError
        Pickled models, checkpoints that do not match ``arch``.

    Examples
    --------
    >>> model = load("pruned.pt")  # doctest: +SKIP
    """
    sd, info = read_checkpoint(path)
    if info.kind == "tdump":
        if arch is not None and arch != info.arch:
            raise CheckpointError(
                f"{os.fspath(path)} is a tdump checkpoint of {info.arch}, not {arch}; drop --arch or fix it"
            )
        arch, kwargs, ignore = info.arch, info.arch_kwargs, info.ignore or ignore
    else:
        arch = arch or info.arch
        kwargs = dict(arch_kwargs) if arch_kwargs is not None else info.arch_kwargs
        if arch is None:
            raise CheckpointError(
                f"{os.fspath(path)} is a plain state_dict; say which model it belongs to with --arch "
                "(e.g. --arch torchvision.models.resnet18 --arch-kwargs '{\"num_classes\": 10}')"
            )
    assert arch is not None
    model = build_arch(arch, kwargs)
    cumulative = Plan.from_dict({"layers": info.plan}) if info.plan else Plan()
    if cumulative.layers:
        graph = build_graph(model, ignore)
        try:
            keeps = keeps_for(graph, cumulative)
        except ConfigError as exc:
            raise CheckpointError(
                f"{os.fspath(path)}: its channel plan does not fit {arch}: {exc}"
            ) from None
        apply_keeps(model, graph, keeps)
    load_state(model, sd, arch, os.fspath(path))
    model.__dict__[_ATTR] = Provenance(arch, dict(kwargs), cumulative, info.rounds, ignore)
    return model


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` as a tdump checkpoint (atomically; see docs/FORMAT.md section 3).

    ``arch``/``arch_kwargs`` default to what :func:`load` recorded; a model built in
    Python needs ``arch`` (an import path whose call with ``arch_kwargs`` builds the
    unpruned architecture).

    Examples
    --------
    >>> import numpy as np, torchvision
    >>> small, _ = prune(torchvision.models.resnet18(), {"conv1": np.arange(64.0)}, count=8)
    >>> save("pruned.pt", small, arch="torchvision.models.resnet18")  # doctest: +SKIP
    """
    prov = provenance(model)
    arch = arch or prov.arch
    if arch is None:
        raise ConfigError(
            "save needs arch= (an import path such as torchvision.models.resnet18) for a model tdump did not load"
        )
    kwargs = dict(arch_kwargs) if arch_kwargs is not None else prov.arch_kwargs
    layers = prov.plan.to_dict()["layers"]
    write_checkpoint(path, model, arch, kwargs, layers, rounds=prov.rounds, ignore=prov.ignore)
