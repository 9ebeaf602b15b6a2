"""Surgery: checkpoint + ranks -> smaller checkpoint, via a torch.fx dependency graph.

:func:`prune` removes the lowest-ranked conv filters and everything coupled to them
(BatchNorm entries, consumers' input channels, residual partners, concatenation
slices, depthwise convs); :func:`save` writes a pickle-free checkpoint and
:func:`load` rebuilds the model from it. The selection keywords of :func:`prune` and
:func:`plan` may come as one checked :class:`Settings` (``settings=``). See docs/surgery.md.

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

import typing as _typing
from collections.abc import Sequence

from tdump.surgery._aggregate import register_aggregation
from tdump.surgery._apply import apply_keeps, single_threaded
from tdump.surgery._arch import build_arch, is_registered_arch, register_arch, registered_archs
from tdump.surgery._graph import ChannelGraph, Group, build_graph
from tdump.surgery._io import _ATTR, Provenance, load, provenance, save
from tdump.surgery._plan import (
    FewChannelsWarning,
    LayerPlan,
    Plan,
    Settings,
    keeps_for,
    resolve_settings,
    select,
)
from tdump.surgery._ranks import RanksLike, read_ranks_table, scores_for
from tdump.surgery._stats import count_params, layer_flops, layer_params, output_positions
from tdump.surgery._weight_norm import copy_model

if _typing.TYPE_CHECKING:  # annotations only: keep the namespace to __all__
    from torch import nn

__all__ = [
    "ChannelGraph",
    "FewChannelsWarning",
    "Group",
    "LayerPlan",
    "Plan",
    "Provenance",
    "Settings",
    "apply",
    "build_arch",
    "build_graph",
    "count_params",
    "is_registered_arch",
    "layer_flops",
    "layer_params",
    "load",
    "output_positions",
    "plan",
    "provenance",
    "prune",
    "read_ranks_table",
    "register_aggregation",
    "register_arch",
    "registered_archs",
    "save",
]


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
    settings: Settings | None = None,
    input_shape: Sequence[int] | None = None,
) -> Plan:
    """Choose what :func:`prune` would remove, without touching ``model``.

    Parameters are those of :func:`prune`: the selection keywords, or one
    :class:`Settings` as ``settings=``.

    Examples
    --------
    >>> import numpy as np, torchvision
    >>> p = plan(torchvision.models.vgg11_bn(), {"features.0": np.arange(64.0)}, ratio=0.25, scope="per-layer")
    >>> len(p.layers["features.0"].keep)
    48
    >>> s = Settings(ratio=0.25, scope="per-layer")
    >>> plan(torchvision.models.vgg11_bn(), {"features.0": np.arange(64.0)}, settings=s).layers == p.layers
    True
    """
    chosen = resolve_settings(
        settings,
        count=count,
        ratio=ratio,
        scope=scope,
        min_channels=min_channels,
        max_ratio=max_ratio,
        round_to=round_to,
        conv_only_groups=conv_only_groups,
        aggregate=aggregate,
        normalize=normalize,
    )
    graph = _graph(model, ignore, input_shape)  # as prune would trace it
    return select(graph, scores_for(model, ranks, criterion), chosen)


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
    settings: Settings | None = None,
    inplace: bool = False,
    input_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, Plan]:
    """Remove the lowest-ranked output channels of convs and Linears, and all coupled to them.

    Parameters
    ----------
    model : nn.Module
        A model torch.fx can trace (see ``ignore``).
    ranks : path, DataFrame or dict
        ``ranks.parquet`` (tdump.ranks v1), its DataFrame, or ``{layer: scores}``.
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
        Kept counts stay multiples of this (hardware-friendly): the global scope
        removes whole steps, as close to ``count``/``ratio`` as they allow without
        passing it; per-layer rounds each kept count up.
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
    settings : Settings, optional
        All the selection keywords above but ``ignore`` and ``criterion`` as one
        :class:`Settings`, already checked (``tdump prune`` builds one from its options
        before reading any file); used as it is. Give it or those keywords, not both.
    inplace : bool
        Rewrite ``model`` itself instead of a deep copy.
    input_shape : sequence of int, optional
        The model's input shape, batch excluded (``(3, 224, 224)``). Needed only by a
        forward that branches on shapes (``if x.dim() == 3:``), which torch.fx cannot
        follow: it is then traced at this shape. Kept with the model (and in its
        checkpoint), so later rounds and :func:`load` trace it the same way.

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
    >>> _, q = prune(m, {"features.1.conv.0.0": np.arange(32.0)}, settings=Settings(count=8))
    >>> q.removed
    8
    """
    chosen = resolve_settings(
        settings,
        count=count,
        ratio=ratio,
        scope=scope,
        min_channels=min_channels,
        max_ratio=max_ratio,
        round_to=round_to,
        conv_only_groups=conv_only_groups,
        aggregate=aggregate,
        normalize=normalize,
    )
    scores = scores_for(model, ranks, criterion)
    if inplace:
        target = model
    else:
        with single_threaded():
            target = copy_model(model)
    graph = _graph(target, ignore, input_shape)
    p = select(graph, scores, chosen)
    apply_keeps(target, graph, keeps_for(graph, p))
    _one_round_more(target, p, graph)
    return target, p


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    ignore: str | None = None,
    inplace: bool = False,
    input_shape: Sequence[int] | None = None,
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
    target = model if inplace else copy_model(model)
    graph = _graph(target, ignore, input_shape)
    apply_keeps(target, graph, keeps_for(graph, plan))
    _one_round_more(target, plan, graph)
    return target


def _graph(model: nn.Module, ignore: str | None, input_shape: Sequence[int] | None) -> ChannelGraph:
    """``model``'s channel graph: traced with ``ignore`` and ``input_shape``, else with the
    ones its provenance recorded (a deep copy keeps the original's)."""
    prev = provenance(model)
    return build_graph(model, ignore or prev.ignore, input_shape or prev.input_shape)


def _one_round_more(model: nn.Module, plan: Plan, graph: ChannelGraph) -> None:
    """Compose ``plan`` onto ``model``'s provenance, with how ``graph`` was traced."""
    prev = provenance(model)
    model.__dict__[_ATTR] = Provenance(
        prev.arch,
        dict(prev.arch_kwargs),
        prev.plan.compose(plan),
        prev.rounds + 1,
        graph.ignore,
        input_shape=graph.input_shape,
    )


def __dir__() -> list[str]:
    """``dir(tdump.surgery)`` lists the public API only."""
    return sorted(__all__)
