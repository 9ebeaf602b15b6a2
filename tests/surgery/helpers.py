"""Helpers: ranks tables in the tdump.ranks schema, zeroing channels, model factories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from tdump.analyze import write_ranks as analyze_write_ranks
from tdump.analyze._ranks_io import normalize_scores
from tdump.surgery import build_graph


def ranks_frame(scores: dict[str, np.ndarray], criterion: str = "l1") -> pd.DataFrame:
    """A ranks table in the tdump.ranks v1 schema (docs/FORMAT.md section 2) from ``{layer: scores}``."""
    frames = [
        pd.DataFrame(
            {
                "layer": layer,
                "channel": np.arange(len(s), dtype=np.int64),
                "score": np.asarray(s, dtype=np.float64),
            }
        )
        for layer, s in scores.items()
    ]
    df = pd.concat(frames, ignore_index=True).assign(
        criterion=criterion, steps=1, examples=0, mode="train"
    )
    df["sources"] = df["layer"] + ".weight"
    return normalize_scores(df.astype({"steps": "int64", "examples": "int64"}))


def write_ranks(path: Path, scores: dict[str, np.ndarray]) -> Path:
    """Write ``ranks.parquet`` with the rank stage's own writer."""
    analyze_write_ranks(ranks_frame(scores), path, meta={"criterion": "l1", "normalize": True})
    return path


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Random positive scores for every conv of ``model``."""
    rng = np.random.default_rng(seed)
    return {
        n: rng.uniform(0.1, 1.0, m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (so equivalence means something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


_ZEROABLE = ("conv", "depthwise", "grouped", "bn", "linear")  # rows of weight and bias


def zero_and_rank(
    model: nn.Module, fraction: float = 0.25, seed: int = 0
) -> tuple[dict[str, np.ndarray], int]:
    """Zero a random ``fraction`` of every prunable group's channels and rank exactly those lowest.

    The conv filters, their biases and every BatchNorm scale/bias carrying those channels
    (the group's own and any after a concatenation) are set to 0, so the channels are 0
    after BatchNorm everywhere. Returns ``(scores, channels zeroed)``.
    """
    graph = build_graph(model)
    rng = np.random.default_rng(seed)
    scores: dict[str, np.ndarray] = {}
    removed: dict[int, np.ndarray] = {}
    for grp in graph.groups:
        if grp.frozen or grp.size < 2:
            continue
        width = grp.size // grp.blocks  # a grouped conv's outputs go in equal numbers per block
        k = max(1, int(width * fraction))
        idx = np.sort(
            np.concatenate(
                [b * width + rng.choice(width, k, replace=False) for b in range(grp.blocks)]
            )
        )
        removed[grp.gid] = idx
        s = rng.uniform(1.0, 2.0, grp.size)
        s[idx] = 0.0
        for member in grp.members:
            scores[member] = s
    with torch.no_grad():
        for name, (out_idx, _) in graph.module_indices(removed).items():
            if out_idx is None or graph.uses[name].kind not in _ZEROABLE:
                continue
            mod = model.get_submodule(name)
            t = torch.from_numpy(out_idx)
            mod.weight[t] = 0
            if mod.bias is not None:
                mod.bias[t] = 0
    return scores, sum(len(v) for v in removed.values())
