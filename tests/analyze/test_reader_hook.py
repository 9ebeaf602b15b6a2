"""Readers on a dump written by the real capture Hook from a tiny CNN."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tdump  # noqa: E402
from tdump._format import StoreReader  # noqa: E402
from tdump.analyze import Trial  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 3),
    )


@pytest.fixture(scope="module")
def hook_dump(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, np.ndarray]]:
    """Train 5 steps (last batch smaller), eval 2; keep the '4.output' ReLU values seen."""
    from tdump.capture import Hook

    path = str(tmp_path_factory.mktemp("hook") / "dump.zarr")
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: dict[int, np.ndarray] = {}
    step = {"n": 0}
    model[4].register_forward_hook(
        lambda m, i, o: (
            seen.__setitem__(step["n"], o.detach().numpy().copy()) if m.training else None
        )
    )
    gen = torch.Generator().manual_seed(1)
    with Hook(
        path, include_regex=r".*relu|\d\.weight|\d\.bias|running_mean|^4\.output", save_interval=2
    ) as hook:
        hook.register_module(model)
        hook.register_loss(loss_fn)
        for i in range(5):
            step["n"] = i
            bs = 3 if i == 4 else 5
            x = torch.randn(bs, 1, 8, 8, generator=gen)
            y = torch.randint(0, 3, (bs,), generator=gen)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            hook.save_scalar("lr", 0.1)
            opt.step()
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 1, 8, 8, generator=gen))
    return path, seen


def test_hook_dump_through_all_readers(hook_dump: tuple[str, dict[int, np.ndarray]]) -> None:
    path, seen = hook_dump
    raw = StoreReader(path)
    trial = Trial(path)
    dt = tdump.open_dump(path)
    assert trial.modes() == raw.modes()
    assert "train" in trial.modes()
    saved_steps = trial.steps(mode="train")
    assert saved_steps == raw.steps("train").tolist()
    assert saved_steps == [0, 2, 4]
    names = trial.tensor_names(mode="train")
    assert names == raw.tensor_names("train")
    assert "4.output_0" in names and "0.weight" in names
    # every tensor: tree, Trial and raw zarr agree
    for name in names:
        da_ = dt.tdump.tensor(name, mode="train")
        for rec, s in enumerate(saved_steps):
            if s not in trial.tensor(name).steps(mode="train"):
                continue
            v = trial.tensor(name).value(s, mode="train")
            lazy = da_.sel(step=s).values
            np.testing.assert_array_equal(
                lazy[tuple(slice(0, n) for n in v.shape)], v, err_msg=name
            )
            if v.dtype.kind == "f":
                np.testing.assert_array_equal(
                    np.asarray(raw.array("train", name)[rec])[tuple(slice(0, n) for n in v.shape)],
                    v,
                )
    # activations equal what a plain forward hook saw; the last batch (3 of 5) is trimmed
    for s in saved_steps:
        np.testing.assert_allclose(
            trial.tensor("4.output_0").value(s, mode="train"), seen[s], rtol=1e-6, atol=0
        )
    assert trial.tensor("4.output_0").value(4, mode="train").shape[0] == 3
    assert dt["train"].coords["batch_size"].values.tolist() == [5, 5, 3]
    assert dt["train/4"]["output_0"].dims[:3] == ("step", "batch", "channel")
    assert trial.modules["0"]["type"].endswith("Conv2d")
    assert dt.tdump.modules["3"]["config"]["out_channels"] == 6
    assert set(trial.scalar("lr", mode="train")) == {0, 2, 4}
    # eval has its own step counter
    assert trial.steps(mode="eval") == [0]
    assert dt["eval/4"]["output_0"].sizes["batch"] == 4
    assert "4.output_0.grad" not in trial.tensor_names(mode="eval")
