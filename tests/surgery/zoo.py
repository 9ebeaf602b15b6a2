"""Every torchvision classifier through the surgery, with an independent equivalence check.

Used by ``tests/surgery/test_zoo.py`` and ``benchmarks/coverage.py``. For one model:
build it (random weights, 10 classes, the smallest input it accepts), rank every conv by
the L1 norm of its filters, prune ``ratio=0.3`` (global and per-layer), and check

* the output shape;
* **equivalence** (float64) against the *unpruned* model in which the removed channels
  are taken out by forward hooks, independently of the surgery's channel graph: each
  pruned conv's removed outputs are set to NaN, NaN flows on through every per-channel
  operation (BatchNorm, activations, pooling, additions, concatenations, shuffles), and
  every operation that mixes channels (conv, linear, LayerNorm) treats NaN inputs as
  absent (zero weight; LayerNorm over the channels still there). Pruning is exact iff
  the pruned model's output equals this reference (a NaN reaching the output means a
  removed channel was still needed);
* save -> ``torch.load(weights_only=True)`` -> :func:`tdump.surgery.load` gives the same
  outputs;
* a training-mode forward and backward (every parameter gets a gradient).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tdump.surgery as surgery

#: Input side (square) per model where 32 is too small; batch 2 everywhere (BatchNorm in training).
SIZES: dict[str, int] = {
    "alexnet": 63,
    "googlenet": 32,
    "inception_v3": 299,  # its AuxLogits needs the full-size 17x17 Mixed_6e map
    "maxvit_t": 224,
    "squeezenet1_0": 48,
    "squeezenet1_1": 48,
    **{f"vit_{v}": 0 for v in ("b_16", "b_32", "h_14", "l_16", "l_32")},  # see KWARGS
}
#: Builder keyword arguments (JSON-able: they go into the checkpoint) beyond num_classes.
KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": True, "init_weights": False},
    "inception_v3": {"aux_logits": True, "init_weights": False},
    "maxvit_t": {"input_size": [224, 224]},  # 7x7 windows over 1/32 of the input: 224 at least
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 64},
    "vit_h_14": {"image_size": 28},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 64},
}
RATIO = 0.3
SCOPES = ("global", "per-layer")


def names() -> list[str]:
    """All torchvision classification builders (80 in torchvision 0.29)."""
    return list(torchvision.models.list_models(module=torchvision.models))


def input_size(name: str) -> int:
    """The square input side the checks use for ``name``."""
    kw = KWARGS.get(name, {})
    return int(kw.get("image_size") or SIZES.get(name) or 32)


def build(name: str) -> nn.Module:
    """``name`` with 10 classes and random weights, BatchNorm statistics made non-trivial."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **KWARGS.get(name, {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and (
                m.weight is not None
            ):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


def l1_scores(model: nn.Module) -> dict[str, np.ndarray]:
    """L1 norm of every conv filter and every Linear output row (higher = more important).

    A grouped transposed conv other than a depthwise one gets none, as from ``tdump
    rank`` (it keeps the channels it reads and makes).
    """
    return {
        n: _filters_first(m).abs().flatten(1).sum(1).double().numpy()
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
        and not (
            isinstance(m, nn.modules.conv._ConvTransposeNd)
            and m.groups > 1
            and not m.groups == m.in_channels == m.out_channels
        )
    }


def l1_prune(model: nn.Module, ratio: float = RATIO) -> tuple[nn.Module, surgery.Plan]:
    """``model`` pruned by :func:`l1_scores` (global scope), few-channel warnings quiet."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", surgery.FewChannelsWarning)
        return surgery.prune(model, l1_scores(model), ratio=ratio)


def _filters_first(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()  # a transposed conv's is (in, out / groups, ...): depthwise, (C, 1, ...)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 1
    return w.transpose(0, 1) if transposed else w


def _removed(plan: surgery.Plan) -> dict[str, torch.Tensor]:
    out = {}
    for name, lp in plan.layers.items():
        gone = np.setdiff1d(np.arange(lp.channels), np.asarray(lp.keep))
        out[name] = torch.from_numpy(gone)
    return out


def _channel_axis(m: nn.Module, x: torch.Tensor) -> int:
    return -1 if isinstance(m, nn.Linear) or x.dim() == 2 else 1


def zeroed_reference(model: nn.Module, plan: surgery.Plan) -> list[Any]:
    """Forward hooks on ``model`` computing the removed channels away (see the module doc).

    Returns the hook handles (call ``.remove()`` on each).
    """
    removed = _removed(plan)
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(
                m.register_forward_hook(_mixing_hook(removed.get(name)), with_kwargs=False)
            )
            handles.append(m.register_forward_pre_hook(_zero_nan_inputs))
        elif isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_hook(_layer_norm_hook))
    return handles


def _zero_nan_inputs(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    m.__dict__["_zoo_nan"] = None
    if not torch.isnan(x).any():
        return args
    groups = int(getattr(m, "groups", 1))
    if groups > 1:  # a group whose inputs are all removed is removed too
        per = torch.isnan(x).transpose(0, 1).reshape(groups, -1).all(dim=1)
        m.__dict__["_zoo_nan"] = per
    return (torch.nan_to_num(x, nan=0.0), *args[1:])


def _mixing_hook(gone: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        per = m.__dict__.get("_zoo_nan")
        axis = _channel_axis(m, out)
        if per is not None and bool(per.any()):
            out = out.clone()
            idx = torch.nonzero(per.repeat_interleave(out.shape[axis] // per.numel())).flatten()
            out.index_fill_(axis, idx, float("nan"))
        if gone is not None and gone.numel():
            out = out.index_fill(axis, gone, float("nan"))
        return out

    return hook


def _layer_norm_hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    if not torch.isnan(x).any():
        return out
    axis = -1 if x.shape[-1] == m.normalized_shape[-1] else 1  # LayerNorm2d: channels at dim 1
    xs = x.movedim(axis, -1)
    keep = ~torch.isnan(xs).reshape(-1, xs.shape[-1]).any(0)
    y = torch.full_like(xs, float("nan"))
    w = m.weight[keep] if m.weight is not None else None
    b = m.bias[keep] if m.bias is not None else None
    y[..., keep] = F.layer_norm(xs[..., keep], (int(keep.sum()),), w, b, m.eps)
    return y.movedim(-1, axis)


def detections(out: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """A detection model's output as one tensor: every image's boxes, then its scores."""
    return torch.cat([torch.cat([d["boxes"].flatten(), d["scores"]]) for d in out])


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _all(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


@dataclass
class Result:
    """One model, one scope."""

    name: str
    scope: str
    status: str = "ok"  # "ok" or the first failed check with its reason
    params_before: int = 0
    params_after: int = 0
    filters_before: int = 0
    filters_removed: int = 0
    prune_s: float = 0.0
    max_rel_err: float = float("nan")
    notes: list[str] = field(default_factory=list)


def _filters(model: nn.Module) -> int:
    return sum(
        int(m.out_channels) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
    )


@torch.no_grad()
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(
    name: str,
    tmp: Path,
    scopes: tuple[str, ...] = SCOPES,
    save_load: bool = True,
    full: tuple[str, ...] = SCOPES,
    dtype: torch.dtype = torch.float64,
) -> list[Result]:
    """Run the checks on ``name`` for each scope; never raises (failures are statuses).

    Scopes not in ``full`` get only the prune and equivalence checks. ``float32``
    halves the memory of the largest models (equivalence to 1e-4 instead of 1e-9). Runs on one
    thread: small tensors gain nothing from intra-op threads, and on a busy machine
    their synchronisation made the checks 7x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _check(name, tmp, scopes, save_load, full, dtype)
    finally:
        torch.set_num_threads(threads)


def _check(
    name: str,
    tmp: Path,
    scopes: tuple[str, ...],
    save_load: bool,
    full: tuple[str, ...],
    dtype: torch.dtype,
) -> list[Result]:
    import warnings

    model = build(name).to(dtype)  # once: the pruned copies have this dtype too
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    size = input_size(name)
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    scores = l1_scores(model)
    results = []
    for scope in scopes:
        res = Result(
            name, scope, params_before=surgery.count_params(model), filters_before=_filters(model)
        )
        results.append(res)
        stage = "prune"
        pruned: nn.Module | None = None
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", surgery.FewChannelsWarning)
                pruned, plan = surgery.prune(model, scores, ratio=RATIO, scope=scope)
            res.prune_s = time.perf_counter() - t0
            res.notes = list(plan.notes)
            res.params_after = surgery.count_params(pruned)
            res.filters_removed = res.filters_before - _filters(pruned)
            stage = "equivalence"
            res.max_rel_err = _equivalence(model, pruned, plan, x)
            if not res.max_rel_err < tol:
                raise AssertionError(f"max relative error {res.max_rel_err:.3g}")
            if scope not in full:
                continue
            if save_load:
                stage = "save/load"
                _save_load(name, pruned, x, tmp / f"{name}-{scope}.pt")
            stage = "train"
            _train_step(pruned, x)
        except Exception as exc:  # a status, not a crash: the table lists every model
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            res.status = f"{stage}: {type(exc).__name__}: {first[:300]}"
        finally:
            del pruned  # one pruned copy at a time (the largest models are gigabytes)
            gc.collect()
    return results


def reference_output(model: nn.Module, plan: surgery.Plan, x: torch.Tensor, *more: Any) -> Any:
    """``model(x, *more)`` with ``plan``'s removed channels computed away
    (:func:`zeroed_reference`)."""
    handles = zeroed_reference(model, plan)
    try:
        with torch.no_grad():
            return model(x, *more)
    finally:
        for h in handles:
            h.remove()


def assert_equivalent(
    model: nn.Module,
    pruned: nn.Module,
    plan: surgery.Plan,
    x: torch.Tensor,
    *more: Any,
    out: Callable[[Any], torch.Tensor] = lambda y: y,
) -> None:
    """``pruned(x, *more)`` equals :func:`reference_output` (float64: to 1e-12)."""
    ref = out(reference_output(model, plan, x, *more))
    with torch.no_grad():
        got = out(pruned.eval()(x, *more))
    assert got.shape == ref.shape
    assert _rel_err(got, ref) < 1e-12


def _equivalence(model: nn.Module, pruned: nn.Module, plan: surgery.Plan, x: torch.Tensor) -> float:
    ref = _logits(reference_output(model, plan, x))
    with torch.no_grad():
        got = _logits(pruned(x))
    if got.shape != (x.shape[0], 10):
        raise AssertionError(f"output shape {tuple(got.shape)}")
    return _rel_err(got, ref)


def _save_load(name: str, pruned: nn.Module, x: torch.Tensor, path: Path) -> None:
    surgery.save(
        path,
        pruned,
        arch=f"torchvision.models.{name}",
        arch_kwargs={"num_classes": 10, **KWARGS.get(name, {})},
    )
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, dict) and raw.get("format") == "tdump.checkpoint"
    del raw
    back = surgery.load(path).eval().to(x.dtype)  # the checkpoint holds weights of x's dtype
    with torch.no_grad():
        torch.testing.assert_close(_logits(back(x)), _logits(pruned.eval()(x)), rtol=0, atol=0)
    path.unlink()


def _train_step(pruned: nn.Module, x: torch.Tensor) -> None:
    pruned.train()
    try:
        loss = sum(o.square().mean() for o in _all(pruned(x)))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        missing = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise AssertionError(f"no gradient for {len(missing)} parameters, e.g. {missing[0]}")
    finally:
        pruned.eval()
        pruned.zero_grad(set_to_none=True)
