"""Hook options on a tiny real model: modes, frozen params, batch sizes, dtypes, reductions, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from tdump._format import StoreReader
from tdump.capture import CollectionConfig, Hook, HookConfig
from tdump.errors import ConfigError, SelectionError

from .conftest import SEED, load_script

TinyNet = load_script("train_tiny").TinyNet


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(hook: Hook, model: nn.Module, sizes: list[int]) -> None:
    crit = nn.CrossEntropyLoss()
    hook.register_module(model)
    hook.register_loss(crit)
    model.train()
    for i, n in enumerate(sizes):
        x, y = _data(n, i)
        crit(model(x), y).backward()


def test_eval_mode_has_its_own_counter(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    with Hook(str(tmp_path / "d.zarr"), include_regex=SEED, save_interval=2, strict=True) as hook:
        _train(hook, model, [4, 4, 4])
        model.eval()
        with torch.no_grad():
            for i in range(5):
                model(_data(3, 10 + i)[0])
        model.train()
        _train(hook, model, [4])
        hook.set_mode("predict")
        with torch.no_grad():
            model(_data(2)[0])
    r = StoreReader(str(tmp_path / "d.zarr"))
    assert r.steps("train").tolist() == [0, 2]  # train steps 0..3; step 3 not saved
    assert r.steps("eval").tolist() == [0, 2, 4]
    assert r.steps("predict").tolist() == [0]
    assert "relu.output_1" in r.tensor_names("eval")
    assert not any(n.endswith(".grad") for n in r.tensor_names("eval"))
    assert r.records("eval")["batch_size"].tolist() == [3, 3, 3]
    assert set(r.meta()["calls"]) == {"train", "eval", "predict"}


def test_frozen_parameters_skip_gradients(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    model.conv1.weight.requires_grad_(False)
    with Hook(str(tmp_path / "d.zarr"), include_regex=SEED, save_interval=1, strict=True) as hook:
        _train(hook, model, [4, 4])
    names = StoreReader(str(tmp_path / "d.zarr")).tensor_names("train")
    assert "conv1.weight" in names and "conv1.weight.grad" not in names
    assert "conv2.weight.grad" in names and "relu.output_0.grad" in names


def test_smaller_last_batch_is_padded(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    grabbed = []
    model.relu.register_forward_hook(lambda m, a, o: grabbed.append(o.detach().clone()))
    with Hook(str(tmp_path / "d.zarr"), include_regex="relu", save_interval=1, strict=True) as hook:
        _train(hook, model, [4, 4, 3])
    r = StoreReader(str(tmp_path / "d.zarr"))
    assert r.records("train")["batch_size"].tolist() == [4, 4, 3]
    arr = r.array("train", "relu.output_1")
    assert arr.shape[1:] == (4, 8, 8, 8)
    np.testing.assert_allclose(arr[2][:3], grabbed[5].numpy(), rtol=1e-6)
    assert np.isnan(arr[2][3]).all()


def test_float16_and_bfloat16_storage(tmp_path) -> None:
    for dtype, rtol in (("float16", 1e-3), ("bfloat16", 1e-2)):
        torch.manual_seed(0)
        model = TinyNet()
        grabbed: list[torch.Tensor] = []
        model.relu.register_forward_hook(lambda m, a, o, g=grabbed: g.append(o.detach().clone()))
        out = str(tmp_path / f"{dtype}.zarr")
        with Hook(
            out, include_regex="relu|weight", save_interval=1, storage_dtype=dtype, strict=True
        ) as h:
            _train(h, model, [4])
        r = StoreReader(out)
        arr = r.array("train", "relu.output_0")
        assert arr.dtype == (np.float16 if dtype == "float16" else np.float32)
        np.testing.assert_allclose(arr[0].astype("f4"), grabbed[0].numpy(), rtol=rtol, atol=1e-3)
        attrs = r.tensor_attrs("train", "relu.output_0")
        assert attrs["source_dtype"] == "float32" and attrs["storage_dtype"] == dtype


def test_reductions_match_independent_computation(tmp_path) -> None:
    for red in ("abs_mean", "taylor"):
        torch.manual_seed(0)
        model = TinyNet()
        acts: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []

        def keep(m: nn.Module, a: tuple, o: torch.Tensor, acts=acts, kept=kept) -> None:
            acts.append(o.detach().clone())
            o.retain_grad()
            kept.append(o)

        model.relu.register_forward_hook(keep)
        out = str(tmp_path / f"{red}.zarr")
        with Hook(out, include_regex="relu", save_interval=1, reduction=red, strict=True) as hook:
            _train(hook, model, [4])
        r = StoreReader(out)
        if red == "abs_mean":
            got = r.array("train", "relu.output_1")[0]
            np.testing.assert_allclose(got, acts[1].abs().mean((2, 3)).numpy(), rtol=1e-5)
            grad = r.array("train", "relu.output_1.grad")[0]
            np.testing.assert_allclose(
                grad, kept[1].grad.abs().mean((2, 3)).numpy(), rtol=1e-5, atol=1e-9
            )
        else:
            assert r.tensor_names("train") == [
                "loss.input_0.0",
                "loss.input_0.1",
                "loss.output_0",
                "relu.output_0.taylor",
                "relu.output_1.taylor",
            ]
            for k in range(2):
                got = r.array("train", f"relu.output_{k}.taylor")[0]
                want = (acts[k] * kept[k].grad).mean((2, 3)).numpy()
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-10)
        attrs = r.tensor_attrs("train", "relu.output_1" + (".taylor" if red == "taylor" else ""))
        assert attrs["reduction"] == red and attrs["dims"] == ["batch", "channel"]


def test_wrappers_do_not_change_names(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.DataParallel(TinyNet())
    with Hook(
        str(tmp_path / "d.zarr"), include_regex="relu|conv1", save_interval=1, strict=True
    ) as hook:
        _train(hook, model, [2])
    names = StoreReader(str(tmp_path / "d.zarr")).tensor_names("train")
    assert "conv1.weight" in names and "relu.output_1.grad" in names
    assert not any(n.startswith("module.") for n in names)


def test_torch_compile_wrapper_is_unwrapped() -> None:
    model = TinyNet()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    hook = Hook("unused.zarr", include_regex="relu")
    hook.register_module(compiled)
    assert hook._root is model
    assert "conv1" in hook._meta["modules"] and "_orig_mod.conv1" not in hook._meta["modules"]
    hook.close()


def test_collection_overrides_and_losses_every_step(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    colls = {"losses": {"save_interval": 1}, "activations": {"save_steps": [1]}}
    with Hook(
        str(tmp_path / "d.zarr"),
        include_regex="relu",
        save_interval=4,
        collections=colls,
        strict=True,
    ) as hook:
        _train(hook, model, [2, 2, 2])
    r = StoreReader(str(tmp_path / "d.zarr"))
    assert r.steps("train").tolist() == [0, 1, 2]
    assert r.saved_records("train", "loss.output_0").tolist() == [0, 1, 2]
    assert r.saved_records("train", "relu.output_0").tolist() == [1]
    assert r.saved_records("train", "relu.output_0.grad").tolist() == [0]


def test_errors_switch_capture_off_but_training_goes_on(tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):  # seen before training
        Hook(str(blocker / "d.zarr"), include_regex="relu", save_interval=1)
    torch.manual_seed(0)
    model = TinyNet()
    out = tmp_path / "later"
    hook = Hook(str(out / "d.zarr"), include_regex="relu", save_interval=1)
    out.write_text("x")  # the path breaks after the checks: a runtime error in the hook
    with caplog.at_level(logging.ERROR, logger="tdump.capture"):
        _train(hook, model, [2, 2, 2])  # the store cannot be created: logged once, then off
        hook.close()
    assert sum("capture switched off" in r.message for r in caplog.records) == 1
    # nothing of the hook is left on the model: training runs at full speed again
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    strict = Hook(
        str(tmp_path / "s" / "e.zarr"), include_regex="relu", save_interval=1, strict=True
    )
    (tmp_path / "s").write_text("x")
    with pytest.raises(Exception):  # noqa: B017 - whatever the filesystem raises
        _train(strict, TinyNet(), [2, 2])
    strict.discard()  # a registered, unclosed hook would make later auto capture step aside


def test_config_validation_and_roundtrip() -> None:
    with pytest.raises(SelectionError, match="invalid include_regex"):
        HookConfig(include_regex="(")
    with pytest.raises(ConfigError):
        HookConfig(save_interval=0)
    with pytest.raises(ConfigError):
        CollectionConfig("nope")
    with pytest.raises(SelectionError, match="matches no tensor"):
        Hook("x.zarr", include_regex="zzz").register_module(TinyNet())
    cfg = HookConfig(
        include_regex="relu", collections=(CollectionConfig("losses", save_interval=1),)
    )
    assert HookConfig.from_dict(cfg.to_dict()) == cfg
    assert Hook.from_config(cfg).config is cfg


def test_include_activations_selects_activation_modules_by_type(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1),
        nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4),
    )  # fmt: skip
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen["3"] = output.detach().clone()  # returns None: the output stays the module's

    model[3].register_forward_hook(keep)
    out = str(tmp_path / "d.zarr")
    cfg = HookConfig(out=out, include_regex=r".*weight", exclude_regex=r"^5\.",
                     include_activations=True, save_interval=1, strict=True)  # fmt: skip
    with Hook.from_config(cfg) as hook:
        _train(hook, model, [4])
    r = StoreReader(out)
    names = set(r.tensor_names("train"))
    assert {"1.output_0", "1.output_0.grad", "3.output_0", "3.output_0.grad"} <= names
    assert "0.weight" in names  # the regex still selects what it matches
    assert not any(n.startswith(("0.output", "2.output", "4.output")) for n in names)  # convs
    assert not any(n.startswith("5.") for n in names)  # exclude_regex wins
    np.testing.assert_array_equal(r.array("train", "3.output_0")[0], seen["3"].numpy())
    # with a Taylor reduction the by-type selection keeps just the Taylor term
    out2 = str(tmp_path / "t.zarr")
    with Hook.from_config(cfg.replace(out=out2, reduction="taylor")) as hook:
        _train(hook, model, [4])
    assert {"1.output_0.taylor", "3.output_0.taylor"} <= set(
        StoreReader(out2).tensor_names("train")
    )
    # off (the default for an explicit Hook): only the regex
    out3 = str(tmp_path / "off.zarr")
    with Hook.from_config(cfg.replace(out=out3, include_activations=False)) as hook:
        _train(hook, model, [4])
    assert not any(
        n[0].isdigit() and ".output_" in n for n in StoreReader(out3).tensor_names("train")
    )


def test_without_activation_modules_the_conv_and_norm_outputs_are_recorded(tmp_path) -> None:
    """F.relu after GroupNorm (and InstanceNorm): the norms' outputs are the pre-activations."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.gn = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)
            self.conv2, self.inorm = nn.Conv2d(8, 4, 3), nn.InstanceNorm2d(4, affine=True)
            self.ln = nn.LayerNorm(4)  # over the channels: not a pre-activation of theirs
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.gn(self.conv1(x)))
            x = torch.relu(self.inorm(self.conv2(x)))
            return self.fc(self.ln(x.mean((2, 3))))

    out = str(tmp_path / "d.zarr")
    cfg = HookConfig(out=out, include_regex=r"^$", include_activations=True, save_interval=1)
    with Hook.from_config(cfg.replace(strict=True)) as hook:
        _train(hook, Net(), [4])
        assert hook.preactivations
    names = {n for n in StoreReader(out).tensor_names("train") if ".output_" in n}
    assert names - {"loss.output_0"} == {
        f"{m}.output_0{g}" for m in ("conv1", "gn", "conv2", "inorm") for g in ("", ".grad")
    }
