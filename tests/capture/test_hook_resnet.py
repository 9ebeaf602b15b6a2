"""Hook on torchvision's resnet18: names, shapes, steps, values and gradients vs independent grabs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tdump._format import StoreReader
from tdump.capture import Hook

from .conftest import SEED, batch, resnet18


def _relu_names() -> list[str]:
    names = ["relu.output_0"]
    for layer in range(1, 5):
        for block in range(2):
            names += [f"layer{layer}.{block}.relu.output_0", f"layer{layer}.{block}.relu.output_1"]
    return names


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three train steps at interval 2 with independent grabs of what the hook should save."""
    out = str(tmp_path_factory.mktemp("resnet") / "dump.zarr")
    model = resnet18()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grabbed: dict[int, dict[str, torch.Tensor]] = {}
    outs: dict[int, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def grab(path: str):
        def fn(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            k = counts.get(path, 0)
            counts[path] = k + 1
            name = f"{path}.output_{k}"
            grabbed[step][name] = output.detach().clone()
            if path.endswith("relu"):
                output.retain_grad()
                outs[step][name] = output

        return fn

    for path, mod in model.named_modules():
        if path.endswith("relu") or path.endswith("bn2"):
            mod.register_forward_hook(grab(path))
    with Hook(out, include_regex=SEED + "|layer1.0.bn2", save_interval=2, strict=True) as hook:
        hook.register_module(model)
        hook.register_loss(crit)
        for step in range(3):
            grabbed[step], outs[step], counts = {}, {}, {}
            for n, p in model.named_parameters():
                grabbed[step][n] = p.detach().clone()
            for n, b in model.named_buffers():
                grabbed[step][n] = b.detach().clone()
            x, y = batch(2, seed=step)
            opt.zero_grad()
            logits = model(x)
            loss = crit(logits, y)
            loss.backward()
            grabbed[step]["loss.output_0"] = loss.detach().clone()
            grabbed[step]["loss.input_0.0"] = logits.detach().clone()
            for n, p in model.named_parameters():
                grabbed[step][n + ".grad"] = p.grad.detach().clone()
            for name, t in outs[step].items():
                grabbed[step][name + ".grad"] = t.grad.detach().clone()
            hook.save_scalar("lr", 0.1 * (step + 1))
            opt.step()
    return {"out": out, "grabbed": grabbed, "model": model}


def test_names_shapes_steps(seed_run: dict) -> None:
    r = StoreReader(seed_run["out"])
    assert r.modes() == ["train"]
    assert r.steps("train").tolist() == [0, 2]
    assert r.records("train")["batch_size"].tolist() == [2, 2]
    names = set(r.tensor_names("train"))
    for n in _relu_names():
        assert n in names and n + ".grad" in names
    model = seed_run["model"]
    params = {n for n, _ in model.named_parameters()}
    assert params <= names and {n + ".grad" for n in params} <= names
    assert {"layer1.0.bn1.running_mean", "layer1.0.bn1.running_var", "bn1.running_var"} <= names
    assert "layer1.0.bn1.num_batches_tracked" not in names
    assert {"loss.output_0", "loss.input_0.0", "loss.input_0.1", "scalars.lr"} <= names
    assert not any(".conv1.output" in n for n in names)  # not selected
    assert r.array("train", "layer1.0.relu.output_1").shape[1:] == (2, 64, 8, 8)
    assert r.array("train", "layer4.1.relu.output_0.grad").shape[1:] == (2, 512, 1, 1)
    attrs = r.tensor_attrs("train", "layer1.0.relu.output_1.grad")
    assert attrs["collection"] == "activation_gradients" and attrs["kind"] == "output_grad"
    assert attrs["module"] == "layer1.0.relu" and attrs["call"] == 1
    assert attrs["dims"] == ["batch", "channel", "y", "x"]
    w = r.tensor_attrs("train", "layer1.0.conv1.weight")
    assert w["collection"] == "weights" and w["dims"] == ["out_channel", "in_channel", "ky", "kx"]
    assert r.tensor_attrs("train", "fc.bias")["collection"] == "biases"
    assert r.tensor_attrs("train", "fc.bias.grad")["collection"] == "gradients"


def test_values_equal_independent_grabs(seed_run: dict) -> None:
    r = StoreReader(seed_run["out"])
    grabbed = seed_run["grabbed"]
    checked = 0
    names = set(r.tensor_names("train"))
    arrays = {n: r.array("train", n)[:2] for n in names}
    for rec, step in enumerate([0, 2]):
        for name, want in grabbed[step].items():
            if name not in names or name.endswith("num_batches_tracked"):
                continue
            got = arrays[name][rec]
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
            checked += 1
    assert checked > 250
    np.testing.assert_allclose(r.array("train", "scalars.lr")[:2], [0.1, 0.3], rtol=1e-6)


def test_both_relu_calls_have_their_own_gradients(seed_run: dict) -> None:
    r = StoreReader(seed_run["out"])
    g = seed_run["grabbed"][0]
    g0 = r.array("train", "layer1.0.relu.output_0.grad")[0]
    g1 = r.array("train", "layer1.0.relu.output_1.grad")[0]
    np.testing.assert_allclose(g0, g["layer1.0.relu.output_0.grad"].numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g1, g["layer1.0.relu.output_1.grad"].numpy(), rtol=1e-5, atol=1e-8)
    assert not np.allclose(g0, g1)


def test_inplace_overwrites_do_not_leak(seed_run: dict) -> None:
    """bn2's output is later `+= identity` and ReLU(inplace=True)-ed; the saved value is bn2's."""
    r = StoreReader(seed_run["out"])
    saved = r.array("train", "layer1.0.bn2.output_0")[0]
    assert (saved < 0).any()  # ReLU would have zeroed these
    np.testing.assert_allclose(
        saved, seed_run["grabbed"][0]["layer1.0.bn2.output_0"].numpy(), rtol=1e-6
    )
    # its gradient is the one w.r.t. bn2's output (before `+=` and the in-place ReLU):
    # d(relu(bn2 + identity))/d(bn2) = relu.output_1.grad where relu.output_1 > 0
    g_bn2 = r.array("train", "layer1.0.bn2.output_0.grad")[0]
    relu1 = r.array("train", "layer1.0.relu.output_1")[0]
    g_relu1 = r.array("train", "layer1.0.relu.output_1.grad")[0]
    np.testing.assert_allclose(g_bn2, g_relu1 * (relu1 > 0), rtol=1e-5, atol=1e-9)


def test_module_tree_and_calls(seed_run: dict) -> None:
    meta = StoreReader(seed_run["out"]).meta()
    mods = meta["modules"]
    assert mods[""]["type"] == "torchvision.models.resnet.ResNet"
    assert mods["layer1.0.conv1"]["params"] == {"weight": [64, 64, 3, 3]}
    assert mods["layer1.0.conv1"]["config"]["out_channels"] == 64
    assert mods["layer1.0.bn1"]["buffers"]["running_mean"] == [64]
    calls = {c["name"]: c for c in meta["calls"]["train"]}
    assert calls["conv1.output_0"]["inputs"] == ["<input>"]
    assert calls["layer1.0.relu.output_0"]["inputs"] == ["layer1.0.bn1.output_0"]
    assert calls["layer1.0.bn1.output_0"]["inputs"] == ["layer1.0.conv1.output_0"]
    # `out += identity` keeps bn2 as the producer of the second ReLU call's input
    assert calls["layer1.0.relu.output_1"]["inputs"] == ["layer1.0.bn2.output_0"]
    assert calls["layer1.1.conv1.output_0"]["inputs"] == ["layer1.0.relu.output_1"]
    assert calls["layer2.0.downsample.0.output_0"]["inputs"] == ["layer1.1.relu.output_1"]
    assert calls["layer1.0.relu.output_1"]["shape"] == [2, 64, 8, 8]
    # the sums `out += identity` made, traced back through autograd to the calls added up
    sums = {name: c["sum_of"] for name, c in calls.items() if "sum_of" in c}
    assert sums["layer1.0.relu.output_1"] == ["layer1.0.bn2.output_0", "maxpool.output_0"]
    assert sums["layer1.1.relu.output_1"] == ["layer1.1.bn2.output_0", "layer1.0.relu.output_1"]
    assert sums["layer2.0.relu.output_1"] == [
        "layer2.0.bn2.output_0",
        "layer2.0.downsample.1.output_0",
    ]
    assert set(sums) == {f"layer{i}.{b}.relu.output_1" for i in range(1, 5) for b in (0, 1)}
    order = [c["name"] for c in meta["calls"]["train"]]
    assert order.index("layer1.0.relu.output_0") < order.index("layer1.0.relu.output_1")
    assert meta["config"]["save_interval"] == 2
