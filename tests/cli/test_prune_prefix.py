"""A wrapper's prefix (issue 8, defect 7): a LightningModule records ``model.stem``; the
checkpoint holds ``stem`` (the inner model) or ``model.stem`` (Lightning's own checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tdump
import tdump.surgery as surgery
from tests.cli.inproc import run_main
from tests.surgery.nets import SmallNet

ARCH = ["--arch", "tests.surgery.nets.SmallNet"]


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    return run_main(monkeypatch, capsys, "prune", *args, "--input-shape", "3,8,8")


def test_lightning_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is an optional test dependency")

    class Lit(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = SmallNet()
            self.loss = nn.CrossEntropyLoss()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)  # type: ignore[no-any-return]

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
            x, y = batch
            return self.loss(self(x), y)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    lit = Lit()
    opt = torch.optim.SGD(lit.parameters(), lr=0.01)
    dump = str(tmp_path / "lit.zarr")
    with tdump.Hook(dump, include_regex=r".*\.weight", save_interval=1, strict=True) as hook:
        hook.register_module(lit)
        hook.register_loss(lit.loss)
        for i in range(2):
            opt.zero_grad()
            lit.training_step((torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,))), i).backward()
            opt.step()
    from tdump.analyze import write_ranks

    df = tdump.rank(dump, criterion="l1", scheduler="sync", progress=False)
    assert df["layer"].str.startswith("model.").all()  # what the wrapper records
    ranks = str(write_ranks(df, tmp_path / "ranks.parquet", meta=df.attrs["tdump"]))
    torch.save(lit.model.state_dict(), tmp_path / "inner.pt")
    torch.save(
        {"state_dict": lit.state_dict(), "epoch": 0, "pytorch-lightning_version": pl.__version__},
        tmp_path / "lit.ckpt",
    )

    # the inner model's state_dict: the ranks' prefix is found and stripped, and said
    code, out, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "inner.pt"),
        ranks,
        *ARCH,
        "-o",
        str(tmp_path / "a.pt"),
        "--count",
        "3",
    )
    assert code == 0, err
    assert "stripped the prefix 'model.' from ranked layer names" in out
    # Lightning's checkpoint (keys model.stem.weight ...): stripped from both, automatically ...
    code, out, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "lit.ckpt"),
        ranks,
        *ARCH,
        "-o",
        str(tmp_path / "b.pt"),
        "--count",
        "3",
    )
    assert code == 0, err
    assert "stripped the prefix 'model.' from the checkpoint's keys" in out
    # ... or as told
    code, out, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "lit.ckpt"),
        ranks,
        *ARCH,
        "--prefix",
        "model.",
        "-o",
        str(tmp_path / "c.pt"),
        "--count",
        "3",
    )
    assert code == 0, err
    a, b, c = (surgery.load(tmp_path / f"{n}.pt", "tests.surgery.nets.SmallNet") for n in "abc")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(a(x), c.eval()(x), rtol=0, atol=0)
    assert surgery.count_params(a) < surgery.count_params(lit.model)
    code, _, err = _cli(
        monkeypatch,
        capsys,
        str(tmp_path / "inner.pt"),
        ranks,
        *ARCH,
        "--prefix",
        "net.",
        "--count",
        "3",
    )
    assert code == 1 and "--prefix 'net.' starts no ranked layer name" in err


def test_prefixed_plain_state_dict_of_a_torchvision_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --arch: the dump's model type and the keys under a wrapper's prefix pick resnet18;
    DataParallel's ``module.`` is stripped and said; --prefix fits ranks that lack it."""
    import json

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dump = str(tmp_path / "d.zarr")
    with tdump.Hook(dump, include_regex=".*relu", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 3, 32, 32)).sum().backward()
            opt.step()
    ranks = tdump.rank(dump, criterion="taylor", scheduler="sync", progress=False)
    from tdump.analyze import write_ranks

    write_ranks(ranks, tmp_path / "r.parquet", meta=ranks.attrs["tdump"])
    sd = model.state_dict()
    for prefix in ("model.", "module."):
        torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / f"{prefix}pt")
    common = [str(tmp_path / "r.parquet"), "--count", "20", "--dump", dump, "--json"]

    code, out, err = _cli(
        monkeypatch, capsys, str(tmp_path / "model.pt"), *common, "-o", str(tmp_path / "a.pt")
    )
    assert code == 0, err
    notes = " ".join(json.loads(out)["notes"])
    assert "architecture torchvision.models.resnet18 inferred" in notes
    assert "its keys under 'model.'" in notes and "stripped the prefix 'model.'" in notes
    pruned = tdump.load(tmp_path / "a.pt")
    assert isinstance(pruned, torchvision.models.ResNet)
    assert pruned.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)

    code, out, err = _cli(
        monkeypatch, capsys, str(tmp_path / "module.pt"), *common, "-o", str(tmp_path / "b.pt")
    )
    assert code == 0, err
    assert "stripped the prefix 'module.' from the checkpoint's keys" in json.loads(out)["notes"]

    code, out, err = _cli(
        monkeypatch, capsys, str(tmp_path / "model.pt"), *common, "--prefix", "model.",
        "-o", str(tmp_path / "c.pt"),
    )  # fmt: skip
    assert code == 0, err
    assert torch.equal(
        tdump.load(tmp_path / "c.pt").conv1.weight, tdump.load(tmp_path / "a.pt").conv1.weight
    )
