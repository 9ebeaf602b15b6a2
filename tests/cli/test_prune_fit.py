"""`tdump prune` on what a user walkthrough found: a RegNet state_dict without --arch, the
input shape of the FLOP count, ranks or --like files of another model, grouped convs.

Real models and files: a regnet_x_400mf recorded at 32x32 by the real hook, ranked by
the real rank stage, pruned through the console-script entry point in this process,
reloaded and run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import tdump
import tdump.surgery as surgery
from tests.cli.inproc import run_main
from tests.surgery.helpers import random_scores, write_ranks
from tests.surgery.nets import SmallNet

REGNET = "torchvision.models.regnet_x_400mf"


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    return run_main(monkeypatch, capsys, "prune", *args)


@pytest.fixture(scope="module")
def regnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain state_dict of regnet_x_400mf(num_classes=10), its dump (32x32) and ranks."""
    d = tmp_path_factory.mktemp("regnet")
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(num_classes=10)
    loss = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dump = str(d / "dump.zarr")
    with tdump.Hook(dump, include_regex=r".*\.weight", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        hook.register_loss(loss)
        opt.zero_grad()
        loss(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 10, (2,))).backward()
        opt.step()
    torch.save(model.state_dict(), d / "ckpt.pt")
    from tdump.analyze import write_ranks as write_table

    df = tdump.rank(dump, criterion="l1", scheduler="sync", progress=False)
    write_table(df, d / "ranks.parquet", meta=df.attrs["tdump"])
    return {"dir": d, "ckpt": d / "ckpt.pt", "ranks": d / "ranks.parquet"}


def test_regnet_state_dict_without_arch(
    regnet: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """RegNet's builder computes with tensors (refused on the meta device): still inferred."""
    out = regnet["dir"] / "pruned.pt"
    args = [str(regnet["ckpt"]), str(regnet["ranks"]), "--count", "64", "--json", "-o", str(out)]
    code, stdout, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    summary = json.loads(stdout)
    assert f"architecture {REGNET} inferred" in " ".join(summary["notes"])
    # the FLOPs input is the recorded 32x32, not 31x31 worked back from the stride-2 stem
    assert summary["input_shape"] == [3, 32, 32]
    raw = torch.load(out, weights_only=True)
    assert raw["arch"] == REGNET and raw["arch_kwargs"] == {"num_classes": 10}
    pruned = tdump.load(out)
    assert surgery.count_params(pruned) == summary["params_after"] < summary["params_before"]
    pruned.train()
    pruned(torch.randn(2, 3, 32, 32)).sum().backward()


def test_builders_that_raise_are_said() -> None:
    """No builder fits because they all raise: the error says so, not that keys differ."""
    from tdump.surgery._arch_fit import arch_for_type

    sd = torchvision.models.regnet_x_400mf(num_classes=10).state_dict()
    found, why, tied = arch_for_type("torchvision.models.regnet.RegNet", sd, {"no_such_kwarg": 1})
    assert found is None and tied == ()
    assert "candidate builders raised when built to compare" in why and "no_such_kwarg" in why
    assert "keys and shapes" not in why


def test_grouped_convs_and_round_to_reach_the_count(
    regnet: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grouped convs lose channels per group, --round-to keeps multiples: whole steps still reach the count."""
    args = [str(regnet["ckpt"]), str(regnet["ranks"]), "--arch", REGNET, "--dry-run", "--json"]
    code, stdout, err = _cli(monkeypatch, capsys, *args, "--count", "1000")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["removed_channels"] == 1000, summary["notes"]
    # with --round-to 8 every step is a multiple of 8 (a 25-group conv's is 200): 1000 still fits
    code, stdout, err = _cli(monkeypatch, capsys, *args, "--count", "1001", "--round-to", "8")
    assert code == 0, err
    summary = json.loads(stdout)
    removed = summary["removed_channels"]
    assert removed == 1000, summary["notes"]
    said = " ".join(summary["notes"])
    assert f"removed {removed} of 1001: grouped convs lose channels only in multiples" in said
    assert "round_to keeps channel counts multiples of 8" in said
    assert "more than can be pruned" not in said and "allow" not in said
    # more than the caps allow: that is said, with what they allow
    code, stdout, err = _cli(monkeypatch, capsys, *args, "--count", "100000")
    assert code == 0, err
    said = " ".join(json.loads(stdout)["notes"])
    assert "asked to remove 100000 channels but min_channels/max_ratio allow" in said


def test_ranks_of_another_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """mobilenet_v3_small's checkpoint, squeezenet1_1's ranks: 'features.0' is no conv here."""
    torch.save(
        torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), tmp_path / "m.pt"
    )
    ranks = write_ranks(
        tmp_path / "sq.parquet", random_scores(torchvision.models.squeezenet1_1(num_classes=10))
    )
    out = tmp_path / "p.pt"
    arch = ["--arch", "torchvision.models.mobilenet_v3_small"]
    code, _, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "m.pt"),
        str(ranks),
        *arch,
        "--count",
        "10",
        "-o",
        str(out),
    )
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert (
        "the ranks look like another model's" in err
        and "'features.0': a Conv2dNormActivation" in err
    )
    assert err.rstrip().endswith("rank a dump of this model") and not out.exists()


def test_like_errors_name_their_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--like of another model, or of another round: the numbers quoted are CKPT's, never None."""
    model = SmallNet()
    small, _ = surgery.prune(model, random_scores(model), ratio=0.3)
    surgery.save(tmp_path / "p1.pt", small, arch="tests.surgery.nets.SmallNet")
    torch.save(model.state_dict(), tmp_path / "unpruned.pt")  # not the shapes p1.pt's plan gives
    sq = torchvision.models.squeezenet1_1(num_classes=4)
    torch.save(sq.state_dict(), tmp_path / "sq.pt")  # another architecture altogether
    ranks = write_ranks(tmp_path / "r.parquet", random_scores(small))
    like = ["--like", str(tmp_path / "p1.pt"), "--arch", "tests.surgery.nets.SmallNet"]
    common = [str(ranks), *like, "--count", "1", "-o", str(tmp_path / "o.pt")]

    code, _, err = _cli(monkeypatch, capsys, str(tmp_path / "sq.pt"), *common)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "sq.pt does not match tests.surgery.nets.SmallNet: missing stem.weight" in err
    assert "None" not in err

    code, _, err = _cli(monkeypatch, capsys, str(tmp_path / "unpruned.pt"), *common)
    assert code == 1 and "None" not in err, err
    layer = next(iter(torch.load(tmp_path / "p1.pt", weights_only=True)["plan"]))
    full = model.get_submodule(layer).weight.shape[0]
    kept = small.get_submodule(layer).weight.shape[0]
    assert (
        f"unpruned.pt's {layer}.weight has {full} output channels; the plan keeps {kept} of {full}"
        in err
    )

    # a plan naming a layer the architecture lacks: said, not "None channels"
    raw = dict(torch.load(tmp_path / "p1.pt", weights_only=True))
    raw["plan"] = {**raw["plan"], "nope": {"channels": 3, "keep": [0]}}
    torch.save(raw, tmp_path / "odd.pt")
    torch.save(small.state_dict(), tmp_path / "ft.pt")
    odd = ["--like", str(tmp_path / "odd.pt"), "--arch", "tests.surgery.nets.SmallNet"]
    code, _, err = _cli(
        monkeypatch, capsys, str(tmp_path / "ft.pt"), str(ranks), *odd, "--count", "1"
    )
    assert code == 1 and "None" not in err, err
    assert "odd.pt's plan prunes nope, which tests.surgery.nets.SmallNet lacks" in err
    assert not (tmp_path / "o.pt").exists()


def test_input_shape_from_the_recorded_calls() -> None:
    """The size picked is the one users have (32, 224, 227 -> 228 is the rule's limit)."""
    from tdump.surgery._input_shape import input_shape_from_calls

    def conv(k: int, s: int, p: int | str) -> dict[str, object]:
        cfg = {
            "in_channels": 3,
            "kernel_size": [k, k],
            "stride": [s, s],
            "padding": p if isinstance(p, str) else [p, p],
        }
        return {"type": "torch.nn.modules.conv.Conv2d", "config": cfg}

    def call(module: str, shape: list[int]) -> dict[str, object]:
        return {
            "name": f"{module}.output_0",
            "module": module,
            "call": 0,
            "inputs": ["<input>"],
            "shape": shape,
        }

    cases = [
        (conv(3, 2, 1), [2, 16, 16, 16], [3, 32, 32]),  # mobilenet / regnet stem at 32
        (conv(7, 2, 3), [2, 64, 112, 112], [3, 224, 224]),  # resnet stem at 224
        (conv(3, 2, 0), [2, 64, 111, 111], [3, 224, 224]),  # squeezenet at 224
        (conv(4, 4, 0), [2, 96, 56, 56], [3, 224, 224]),  # patchify stem
        (conv(3, 1, "same"), [2, 8, 30, 30], [3, 30, 30]),
    ]
    for mod, shape, want in cases:
        assert input_shape_from_calls([call("c", shape)], {"c": mod}) == want
    # a shape-keeping module reading the input gives it exactly, and narrows the conv's range
    bn = {"type": "torch.nn.modules.batchnorm.BatchNorm2d", "config": {"num_features": 3}}
    calls = [call("bn", [2, 3, 31, 31]), call("c", [2, 16, 16, 16])]
    assert input_shape_from_calls(calls, {"bn": bn, "c": conv(3, 2, 1)}) == [3, 31, 31]
    assert input_shape_from_calls([], {}) is None


def test_input_shape_recorded_by_the_hook(tmp_path: Path) -> None:
    """A 31x31 input under a stride-2 stem: recorded as 31 (the calls alone would say 32)."""
    import zarr

    from tdump.surgery._input_shape import recorded_input_shape

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    dump = str(tmp_path / "d.zarr")
    with tdump.Hook(dump, include_regex=r".*\.weight", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        for _ in range(2):
            model(torch.randn(5, 3, 31, 31)).sum().backward()
            hook.set_mode("eval")
            model(torch.randn(2, 3, 31, 31))
            hook.set_mode("train")
    meta = zarr.open_group(dump, mode="r")["rank0"].attrs["tdump"]
    assert meta["input_shapes"] == {"train": [[5, 3, 31, 31]], "eval": [[2, 3, 31, 31]]}
    assert recorded_input_shape(dump) == [3, 31, 31]

    # a dump written before input_shapes existed: worked back from the stem's output
    grp = zarr.open_group(dump, mode="r+")["rank0"]
    old = dict(grp.attrs["tdump"])
    del old["input_shapes"]
    grp.attrs["tdump"] = old
    assert recorded_input_shape(dump) == [3, 32, 32]


def test_shape_branching_model_prunes_at_its_input_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's `if x.dim() == 3:` in forward: refused without a shape, pruned with one."""
    from tests.surgery.nets import RootBranch

    torch.manual_seed(0)
    model = RootBranch().eval()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    ranks = write_ranks(tmp_path / "r.parquet", {"conv": np.arange(6.0) + 1})
    args = [str(tmp_path / "ckpt.pt"), str(ranks), "--arch", "tests.surgery.nets.RootBranch"]
    out = tmp_path / "p.pt"

    code, _, err = _cli(monkeypatch, capsys, *args, "--count", "2", "-o", str(out))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "RootBranch.forward itself" in err and "--input-shape C,H,W" in err
    assert not out.exists()

    code, stdout, err = _cli(
        monkeypatch, capsys, *args, "--count", "2", "-o", str(out), "--input-shape", "8,8"
    )
    assert code == 0, err
    assert "traced at input shape 8x8: RootBranch's forward branches on shapes" in stdout
    assert torch.load(out, weights_only=True)["input_shape"] == [8, 8]
    pruned = tdump.load(out, arch=RootBranch).eval()
    assert pruned.conv.out_channels == 4 and pruned(torch.randn(3, 8, 8)).shape == (3, 2)
