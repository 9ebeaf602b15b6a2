"""Training under torch.autocast with a GradScaler: what the dump holds and how ranking
treats a step whose gradients overflowed (docs/capture.md, "Mixed precision")."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdump._format import StoreReader
from tdump.analyze import rank
from tdump.capture import Hook
from tdump.errors import NonFiniteWarning


def test_scaled_gradients_are_recorded_and_an_overflowed_step_is_left_out(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 4),
    )
    opt = torch.optim.SGD(model.parameters(), 0.01)
    # so large that float16 gradients overflow: the scaler skips such a step, halves the scale
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1000)
    out = str(tmp_path / "amp.zarr")
    hook = Hook(out, include_regex=r"[135]\.output_0|0\.weight", save_interval=1)
    hook.register_module(model)
    hook.register_optimizer(opt)
    scales, unscaled = [], []
    for _ in range(6):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled.append(model[0].weight.grad.clone())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    hook.close()
    scales.append(scaler.get_scale())
    skipped = [scales[i + 1] < scales[i] for i in range(6)]
    # no optimizer step ran after a skipped iteration, so the step counter stays and the
    # next iteration is that step's second micro-batch: a step's record is its first one's
    first: dict[int, int] = {}
    for i in range(6):
        first.setdefault(sum(not s for s in skipped[:i]), i)
    overflowed = [k for k, i in first.items() if skipped[i]]
    finite = [k for k, i in first.items() if not skipped[i]]
    assert overflowed and len(finite) >= 2, (scales, first)

    r = StoreReader(out)
    assert list(r.steps("train")) == sorted(first)
    grads = [n for n in r.tensor_names("train") if n.endswith(".grad")]
    for step in overflowed:  # what made the scaler skip it is in the dump
        assert not all(np.isfinite(np.asarray(r.array("train", n)[step])).all() for n in grads)
    for step in finite:  # as backward left them, before unscale_: times the scale, exactly
        i = first[step]
        got = np.asarray(r.array("train", "0.weight.grad")[step])
        np.testing.assert_array_equal(got, unscaled[i].numpy() * scales[i])

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ranks = rank(out, criterion="taylor", progress=False)
    said = [str(w.message) for w in seen if issubclass(w.category, NonFiniteWarning)]
    at = f"at step{'s' if len(overflowed) > 1 else ''} {', '.join(map(str, overflowed))};"
    assert said and all(at in s and "left out of its scores" in s for s in said), said
    without = rank(out, criterion="taylor", steps=finite, progress=False)
    key = ["layer", "channel"]
    a, b = ranks.sort_values(key), without.sort_values(key)
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-12)
