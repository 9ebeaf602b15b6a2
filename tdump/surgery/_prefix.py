"""A wrapper's prefix (``model.`` of a LightningModule) on checkpoint keys and ranked
layer names, found and stripped when the architecture has none.

Examples
--------
>>> common_prefix(["model.conv1.weight", "model.fc.bias"])
'model.'
>>> common_prefix(["conv1.weight", "model.fc.bias"]) is None
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tdump.errors import ConfigError
from tdump.surgery._checkpoint import strip_prefix

__all__ = ["auto_prefix", "common_prefix", "strip_ranks_prefix"]


def auto_prefix(
    sd: OrderedDict[str, torch.Tensor], own: Mapping[str, Any]
) -> tuple[OrderedDict[str, torch.Tensor], str | None]:
    """Strip a wrapper's prefix (``model.`` of a LightningModule) the architecture lacks."""
    if not sd or all(k in own for k in sd):
        return sd, None
    prefix = common_prefix(sd)
    if prefix is None or any(k.startswith(prefix) for k in own):
        return sd, None
    stripped = strip_prefix(sd, prefix)
    if set(stripped) != set(own):
        return sd, None
    return stripped, prefix


def common_prefix(names: Iterable[str]) -> str | None:
    """The one first component every dotted name has (``model.``), if there is one."""
    names = list(names)
    heads = {n.split(".", 1)[0] for n in names}
    if len(heads) != 1 or not all("." in n for n in names):
        return None
    return heads.pop() + "."


def strip_ranks_prefix(
    ranks: Any, model: nn.Module, prefix: str | None = None
) -> tuple[Any, str | None]:
    """Map a ranks DataFrame's layer names onto ``model``: drop a wrapper's prefix.

    A LightningModule (or any wrapper) records ``model.conv1`` where the checkpoint's
    model has ``conv1``. ``prefix`` strips that text from the names that start with it
    (ranks that name the model's layers already are left as they are); without it, a
    prefix is stripped when no ranked layer is in ``model`` but all of them are once
    their shared first component is removed. Returns ``(ranks, prefix
    stripped or None)``.

    Examples
    --------
    >>> import pandas as pd, torch
    >>> df = pd.DataFrame({"layer": ["model.0"], "channel": [0], "score": [1.0]})
    >>> strip_ranks_prefix(df, torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)))[1]
    'model.'
    """
    names = {n for n, _ in model.named_modules()}
    layers = [str(v) for v in ranks["layer"].unique()]
    if prefix is None:
        if not layers or any(n in names for n in layers):
            return ranks, None
        prefix = common_prefix(layers)
        if prefix is None or not all(n[len(prefix) :] in names for n in layers):
            return ranks, None
    elif not any(n.startswith(prefix) for n in layers):
        if any(n in names for n in layers):
            return ranks, None  # the prefix is the checkpoint's only: the ranks fit as they are
        raise ConfigError(
            f"--prefix {prefix!r} starts no ranked layer name (they look like {layers[0]!r})"
        )
    out = ranks.copy()
    out["layer"] = [n[len(prefix) :] if n.startswith(prefix) else n for n in out["layer"]]
    out.attrs = dict(ranks.attrs)
    return out, prefix
