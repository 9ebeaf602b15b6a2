"""Training under torch.autocast with a GradScaler: what the dump holds and how ranking
treats a step whose gradients overflowed (docs/capture.md, "Mixed precision")."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tdump._format import StoreReader
from tdump.analyze import rank
from tdump.capture import Hook, HookConfig, run_script
from tdump.errors import ConfigError, NonFiniteWarning

from .conftest import SCRIPTS


def _settled_scale() -> Any:
    """``GradScaler.scale`` once the watches of hooks that earlier tests dropped without
    close() are gone (collected, then removed at the next scale() call)."""
    gc.collect()
    torch.amp.GradScaler("cpu").scale(torch.ones(()))
    return torch.amp.GradScaler.scale


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 4),
    )


def _train(
    out: str,
    init_scale: float,
    *,
    register: bool = True,
    iterations: int = 6,
    reduction: str | None = None,
) -> dict[str, list[Any]]:
    """Train under float16 autocast; return what the test sees beside the hook, per iteration:
    the scale, the unscale_'d weight gradient of layer 0, and the raw (scaled) gradient
    of ReLU 1's output that backward computed."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), 0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    hook = Hook(
        out,
        include_regex=r"[13]\.output_0|0\.weight",
        save_interval=1,
        strict=True,
        reduction=reduction,
    )
    hook.register_module(model)
    hook.register_optimizer(opt)
    if register:
        hook.register_scaler(scaler)
    seen: dict[str, list[Any]] = {"scale": [], "unscaled": [], "raw": []}
    raw: list[torch.Tensor] = []

    def keep_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.register_hook(raw.append)

    model[1].register_forward_hook(keep_grad)
    torch.manual_seed(1)
    for _ in range(iterations):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        seen["scale"].append(scaler.get_scale())
        scaler.scale(loss).backward()
        seen["raw"].append(raw.pop().clone())
        scaler.unscale_(opt)
        seen["unscaled"].append(model[0].weight.grad.clone())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    hook.close()
    seen["scale"].append(scaler.get_scale())
    return seen


@pytest.mark.parametrize("register", [True, False])
def test_gradients_unscaled_and_an_overflowed_step_left_out(tmp_path: Path, register: bool) -> None:
    out = str(tmp_path / "amp.zarr")
    # so large that float16 gradients overflow: the scaler skips such a step, halves the scale
    seen = _train(out, 2.0**20, register=register)
    scales = seen["scale"]
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
    for step in finite:
        i = first[step]
        got = np.asarray(r.array("train", "0.weight.grad")[step])
        act_grad = np.asarray(r.array("train", "1.output_0.grad")[step])
        raw = seen["raw"][i].numpy()
        assert raw.dtype == np.float16
        if register:  # what unscale_ gives, exactly (the scales are powers of two)
            np.testing.assert_array_equal(got, seen["unscaled"][i].numpy())
            np.testing.assert_array_equal(act_grad, raw.astype(np.float32) / scales[i])
            assert act_grad.dtype == np.float32  # below float16's range, often
            assert float(np.asarray(r.array("train", "scalars.grad_scale")[step])) == scales[i]
        else:  # as backward left them, before unscale_: times the scale, exactly
            np.testing.assert_array_equal(got, seen["unscaled"][i].numpy() * scales[i])
            np.testing.assert_array_equal(act_grad, raw)
    assert ("scalars.grad_scale" in r.tensor_names("train")) == register

    with warnings.catch_warnings(record=True) as said_warnings:
        warnings.simplefilter("always")
        ranks = rank(out, criterion="taylor", progress=False)
    said = [str(w.message) for w in said_warnings if issubclass(w.category, NonFiniteWarning)]
    at = f"at step{'s' if len(overflowed) > 1 else ''} {', '.join(map(str, overflowed))};"
    assert said and all(at in s and "left out of its scores" in s for s in said), said
    without = rank(out, criterion="taylor", steps=finite, progress=False)
    key = ["layer", "channel"]
    a, b = ranks.sort_values(key), without.sort_values(key)
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-12)


@pytest.mark.parametrize("reduction", [None, "taylor"])
def test_scores_do_not_depend_on_the_loss_scale(tmp_path: Path, reduction: str | None) -> None:
    """The same training at two loss scales (no overflow): the same dump, the same ranks;
    with the Taylor terms reduced at source too."""
    runs = {s: str(tmp_path / f"s{int(s)}.zarr") for s in (2.0**11, 2.0**15)}
    for s, out in runs.items():
        seen = _train(out, s, iterations=3, reduction=reduction)
        assert seen["scale"] == [s] * 4  # no step skipped, the scale never grew
    low, high = (StoreReader(out) for out in runs.values())
    outputs = ["1.output_0", "3.output_0"]
    names = [f"{n}.taylor" for n in outputs] if reduction else [f"{n}.grad" for n in outputs]
    assert set(names) <= set(low.tensor_names("train"))
    for name in ["0.weight.grad", *names]:
        np.testing.assert_array_equal(
            np.asarray(low.array("train", name)[:]), np.asarray(high.array("train", name)[:])
        )
    a, b = (rank(out, criterion="taylor", progress=False) for out in runs.values())
    key = ["layer", "channel"]
    np.testing.assert_array_equal(
        a.sort_values(key)["score"].to_numpy(), b.sort_values(key)["score"].to_numpy()
    )


@pytest.mark.parametrize("sharded", [False, True])
def test_record_finds_the_scripts_scaler(tmp_path: Path, sharded: bool) -> None:
    """Also FSDP's ShardedGradScaler, whose own scale() never calls GradScaler's, and
    whose class the script imports after recording began."""
    out, grads = str(tmp_path / "rec.zarr"), tmp_path / "grads.pt"
    original = _settled_scale()
    cfg = HookConfig(out=out, save_interval=1, include_regex=r".*")
    args = ["--grads", str(grads), *(["--sharded"] if sharded else [])]
    assert run_script(str(SCRIPTS / "train_amp.py"), args, cfg) == 0
    assert torch.amp.GradScaler.scale is original  # put back when the script ended
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        assert "__wrapped__" not in vars(ShardedGradScaler.scale)  # and its own too
    want = torch.load(grads, weights_only=True)
    r = StoreReader(out)
    assert r.steps("train").tolist() == [0, 1, 2]
    assert float(np.asarray(r.array("train", "scalars.grad_scale")[0])) == want["scale"]
    for name, g in want["grads"].items():  # what the script's unscale_ made of them
        np.testing.assert_array_equal(np.asarray(r.array("train", f"{name}.grad")[0]), g.numpy())


def test_register_scaler_refuses_what_is_not_a_scaler(tmp_path: Path) -> None:
    hook = Hook(str(tmp_path / "x.zarr"))
    with pytest.raises(ConfigError, match=r"register_scaler takes a torch.amp.GradScaler, not"):
        hook.register_scaler(2.0**16)  # type: ignore[arg-type]
    hook.close()


def test_float16_storage_keeps_the_scale_and_scalars_exact(tmp_path: Path) -> None:
    """2**16 does not fit float16: the loss scale (and any scalar) keeps its own dtype."""
    out = str(tmp_path / "f16.zarr")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with Hook(out, include_regex=r".*", save_interval=1, storage_dtype="float16") as hook:
        hook.register_module(model).register_optimizer(opt).register_scaler(scaler)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(
                model(torch.randn(2, 3, 8, 8)).float(), torch.ones(2, dtype=torch.long)
            )
        scaler.scale(loss).backward()
        hook.save_scalar("lr", 0.1)
        grad = model[0].weight.grad.clone()
        scaler.step(opt)
        scaler.update()
    r = StoreReader(out)
    assert r.array("train", "0.weight.grad").dtype == np.float16  # the tensors: as asked
    got = np.asarray(r.array("train", "0.weight.grad")[0])
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, (grad / 2.0**16).numpy().astype(np.float16))
    for name, want in (("scalars.grad_scale", 2.0**16), ("scalars.lr", 0.1)):
        arr = r.array("train", name)
        assert arr.dtype == np.float32 and "storage_dtype" not in r.tensor_attrs("train", name)
        assert float(np.asarray(arr[0])) == np.float32(want)


@pytest.mark.parametrize("register", [True, False])
def test_an_explicit_hook_says_once_when_a_scaler_it_does_not_know_scales(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, register: bool
) -> None:
    original = _settled_scale()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    out = str(tmp_path / "h.zarr")
    with (
        caplog.at_level("WARNING", logger="tdump.capture"),
        Hook(out, include_regex=r".*", save_interval=1) as hook,
    ):
        hook.register_module(model)
        if register:
            hook.register_scaler(scaler)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(torch.randn(2, 3, 8, 8)).float().sum()
            scaler.scale(loss).backward()
    said = [r.getMessage() for r in caplog.records if f"hook writing {out} " in r.getMessage()]
    assert len(said) == (0 if register else 1), said  # once, not at every iteration
    if not register:
        assert "the gradients are recorded times its scale" in said[0]
    assert torch.amp.GradScaler.scale is original  # the hook's watch went with close()
