"""Read a ranks table (``tdump.ranks`` v1, docs/FORMAT.md section 2) into per-conv scores.

Examples
--------
>>> import pandas as pd, torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
>>> df = pd.DataFrame({"layer": ["0", "0"], "channel": [0, 1], "score": [1.0, 2.0],
...                    "score_norm": [0.5, 1.0], "criterion": ["l1", "l1"]})
>>> scores_for(model, df)
{'0': array([1., 2.])}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from tdump.errors import ConfigError, RanksError

__all__ = ["RanksLike", "read_ranks_table", "scores_for"]

RanksLike = Any  # path, pandas.DataFrame, or {layer: scores}
_REQUIRED = ("layer", "channel")


def read_ranks_table(path: str | os.PathLike[str]) -> Any:
    """Read and validate ``ranks.parquet`` with :func:`tdump.analyze.read_ranks` (a DataFrame)."""
    from tdump.analyze import read_ranks

    return read_ranks(path)


def scores_for(
    model: nn.Module, ranks: RanksLike, criterion: str | None = None
) -> dict[str, np.ndarray]:
    """Per conv layer, the channel scores (index = channel), validated against ``model``.

    Uses the raw ``score`` (higher = more important): the surgery normalises each
    layer itself (:func:`tdump.surgery._aggregate.normalize`), the same way for a table
    and a ``{layer: scores}`` dict.

    Raises
    ------
    RanksError
        Missing columns, several criteria without ``criterion``, layers the model
        lacks or that are not convs, or channel counts that differ from the model's.
    """
    if not isinstance(model, nn.Module):
        what = "a path" if isinstance(model, (str, os.PathLike)) else f"a {type(model).__name__}"
        raise ConfigError(
            f"prune takes the model (an nn.Module), got {what}; load a checkpoint first: "
            "tdump.load(path) (or tdump.load(path, arch=...) for a plain state_dict)"
        )
    if isinstance(ranks, Mapping):
        raw = {str(k): _layer_scores(k, v) for k, v in ranks.items()}
    elif isinstance(ranks, (str, os.PathLike)):
        raw = _from_frame(read_ranks_table(ranks), criterion)
    elif hasattr(ranks, "columns"):
        raw = _from_frame(ranks, criterion)
    else:
        raise RanksError(
            f"ranks must be a ranks.parquet path, its DataFrame or {{layer: scores}}, "
            f"got a {type(ranks).__name__}"
        )
    modules = dict(model.named_modules())
    _check_layers(raw, modules)
    for layer, scores in raw.items():
        width = _width(modules[layer])
        if scores.shape[0] != width:
            raise RanksError(
                f"ranks give layer '{layer}' {scores.shape[0]} channels but the checkpoint has {width}; "
                "rank a dump recorded with this checkpoint"
            )
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        if bad:  # NaN has no order: which channels go would be arbitrary
            raise RanksError(
                f"ranks give {bad} of layer '{layer}''s {width} channels a NaN or Inf score "
                "(a diverged step kept by --keep-nan / keep_nan=True?); pruning cannot order "
                "them: rank again without keep_nan, or leave the layer out of the ranks"
            )
    return raw


def _layer_scores(layer: object, values: Any) -> np.ndarray:
    """One layer's scores of a ``{layer: scores}`` dict as a 1-d float64 array."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1:
        raise RanksError(
            f"ranks for layer '{layer}' must be one number per output channel (1-d), "
            f"got {type(values).__name__}" + ("" if arr is None else f" of shape {arr.shape}")
        )
    return arr


def _width(mod: nn.Module | None) -> int | None:
    """Output channels of a conv, ``out_features`` of a Linear, else None (not prunable)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return int(mod.out_channels)
    if isinstance(mod, nn.Linear):
        return int(mod.out_features)
    return None


def _check_layers(raw: Mapping[str, np.ndarray], modules: Mapping[str, nn.Module]) -> None:
    """Every ranked layer must be a conv or Linear of the model; several that are not: another model's."""
    bad = [layer for layer in raw if _width(modules.get(layer)) is None]
    if not bad:
        return
    layer = bad[0]
    mod = modules.get(layer)
    convs = ", ".join(n for n, m in modules.items() if isinstance(m, nn.Conv2d))[:120]
    if len(bad) > 1:  # one odd name may be a typo; several: the ranks are not this model's
        what = "absent" if mod is None else f"a {type(mod).__name__}"
        raise RanksError(
            f"the ranks look like another model's: {len(bad)} of {len(raw)} ranked layers are not "
            f"convs or Linears of this model (e.g. '{layer}': {what}; its convs: {convs}...); "
            "rank a dump of this model"
        )
    if mod is None:
        raise RanksError(
            f"ranks name layer '{layer}' that the model lacks (its convs: {convs}...); rank a dump of this model"
        )
    raise RanksError(
        f"ranks name layer '{layer}', a {type(mod).__name__}; only the output channels "
        "of conv and Linear layers can be pruned"
    )


def _from_frame(df: Any, criterion: str | None) -> dict[str, np.ndarray]:
    missing = [c for c in _REQUIRED if c not in df.columns]
    col = "score" if "score" in df.columns else "score_norm"
    if missing or col not in df.columns:
        raise RanksError(
            f"ranks table lacks columns {missing or [col]}; expected the tdump.ranks schema (docs/FORMAT.md)"
        )
    if "criterion" in df.columns:
        found = sorted(df["criterion"].dropna().unique().tolist())
        if criterion is not None:
            if criterion not in found:
                raise RanksError(
                    f"no criterion {criterion!r} in the ranks table (it has {', '.join(found)})"
                )
            df = df[df["criterion"] == criterion]
        elif len(found) > 1:
            raise RanksError(
                f"the ranks table holds several criteria ({', '.join(found)}); choose one with --criterion"
            )
    out: dict[str, np.ndarray] = {}
    for layer, part in df.groupby("layer", sort=False):
        ch = part["channel"].to_numpy(dtype=np.int64)
        n = int(ch.max()) + 1 if ch.size else 0
        if ch.size != n or np.unique(ch).size != n or ch.min() < 0:
            raise RanksError(
                f"ranks for layer '{layer}' must list channels 0..N-1 once each (got {ch.size} rows for {n} channels)"
            )
        scores = np.empty(n, dtype=np.float64)
        scores[ch] = part[col].to_numpy(dtype=np.float64)
        if not np.isfinite(scores).all():
            raise RanksError(f"ranks for layer '{layer}' contain NaN or infinite scores")
        out[str(layer)] = scores
    return out
