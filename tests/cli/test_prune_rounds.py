"""Round two with a plain script (issue 8, defects 4 and 5).

record -> rank -> prune -> fine-tune with a script that only knows ``tdump.load``,
``load_state_dict`` and ``torch.save(model.state_dict())`` -> record -> rank -> prune
``--like`` the previous round's checkpoint. The real ``tdump record`` and ``tdump prune``
entry points (in this process), real Dask ranking, resnet18 at 32x32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tdump
import tdump.surgery as surgery
from tests.cli.inproc import run_main

RELU = ".*relu"  # what the taylor criterion reads (outputs and their gradients)


SCRIPT = """import argparse

import torch
import torchvision
from torch import nn

import tdump

p = argparse.ArgumentParser()
p.add_argument("--init", default="")
p.add_argument("--out", required=True)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)
if args.init:
    model = tdump.load(args.init)  # the pruned architecture with its weights
    model.load_state_dict(torch.load(args.init, weights_only=True))  # the usual line works too
else:
    model = torchvision.models.resnet18(num_classes=4)
crit = nn.CrossEntropyLoss()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model.train()
for _ in range(2):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    opt.zero_grad()
    crit(model(x), y).backward()
    opt.step()
torch.save(model.state_dict(), args.out)
"""


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``tdump ARGS`` through the console-script entry point, in this process."""
    return run_main(monkeypatch, capsys, *args)


def record(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dump: str, *args: str
) -> None:
    """`tdump record` the unmodified script (taylor reads ReLU outputs and their gradients)."""
    code, _, err = cli(
        monkeypatch,
        capsys,
        "record",
        "--out",
        dump,
        "--include",
        ".*relu",
        "--interval",
        "1",
        "--strict",
        "train.py",
        "--",
        *args,
    )
    assert code == 0, err


def rank(dump: Path, out: Path) -> Path:
    from tdump.analyze import write_ranks

    df = tdump.rank(str(dump), criterion="taylor", scheduler="sync", progress=False)
    write_ranks(df, out, meta=df.attrs["tdump"])
    return out


def prune(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, object], str]:
    argv = ["prune", *args, "--json", "--input-shape", "3,32,32"]
    code, out, err = cli(monkeypatch, capsys, *argv)
    return code, (json.loads(out) if code == 0 else {}), err


def _check(path: Path, rounds: int) -> nn.Module:
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "tdump.checkpoint" and raw["rounds"] == rounds
    assert raw["arch"] == "torchvision.models.resnet18" and raw["arch_kwargs"] == {"num_classes": 4}
    model = tdump.load(path)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    return model


def test_two_rounds_with_a_plain_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the ranks file names its dump relative to here
    (tmp_path / "train.py").write_text(SCRIPT)
    record(monkeypatch, capsys, "d0.zarr", "--out", "ckpt.pt")
    r0 = rank(Path("d0.zarr"), tmp_path / "r0.parquet")
    # a plain state_dict and no --arch: the dump says the model is a ResNet, the
    # state_dict says resnet18 with 4 classes; both inferences are said
    code, s1, err = prune(monkeypatch, capsys, "ckpt.pt", str(r0), "-o", "p1.pt", "--ratio", "0.2")
    assert code == 0, err
    notes = " ".join(s1["notes"])  # type: ignore[arg-type]
    assert "architecture torchvision.models.resnet18 inferred" in notes
    assert "num_classes=4 inferred" in notes
    p1 = _check(tmp_path / "p1.pt", rounds=1)

    record(monkeypatch, capsys, "d1.zarr", "--init", "p1.pt", "--out", "ft.pt", "--seed", "1")
    ft = tdump.load("ft.pt", like="p1.pt")
    r1 = rank(Path("d1.zarr"), tmp_path / "r1.parquet")
    code, s2, err = prune(
        monkeypatch, capsys, "ft.pt", str(r1), "--like", "p1.pt", "-o", "p2.pt", "--ratio", "0.2"
    )
    assert code == 0, err
    p2 = _check(tmp_path / "p2.pt", rounds=2)
    n0 = surgery.count_params(torchvision.models.resnet18(num_classes=4))
    n1, n2 = surgery.count_params(p1), surgery.count_params(p2)
    assert n2 < n1 < n0 and s2["params_before"] == n1 and s2["params_after"] == n2
    # round two cut the FINE-TUNED weights: kept filters are ft's rows at the round-2 keep
    # indices, and the cumulative plan maps them back to the original channels
    raw1, raw2 = (torch.load(p, weights_only=True)["plan"] for p in ("p1.pt", "p2.pt"))
    ft_mods, p2_mods = dict(ft.named_modules()), dict(p2.named_modules())
    layer = next(k for k in raw2 if k in raw1 and raw2[k]["keep"] != raw1[k]["keep"])
    assert set(raw2[layer]["keep"]) < set(raw1[layer]["keep"])
    rel = [raw1[layer]["keep"].index(i) for i in raw2[layer]["keep"]]
    rows, w_p2 = ft_mods[layer].weight.detach()[rel], p2_mods[layer].weight.detach()
    # each kept input column is one of ft's columns, in order (inputs may have been cut too)
    cols = [
        next(c for c in range(rows.shape[1]) if torch.equal(rows[:, c], w_p2[:, j]))
        for j in range(w_p2.shape[1])
    ]
    assert cols == sorted(set(cols))
