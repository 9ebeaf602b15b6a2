"""Checkpoints are data: no name read from a file is imported or called; bad files give one line.

Issue 7 ("a checkpoint file runs code", the checkpoint error matrix) and issue 11 fix 1
(module versions kept through save, prefix stripping and load).
"""

from __future__ import annotations

import hashlib
import os
import runpy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

import tdump
import tdump.surgery as surgery
from tdump.errors import CheckpointError, ConfigError, TdumpError
from tdump.surgery import _arch
from tests.cli.inproc import run_main
from tests.surgery.helpers import random_scores, write_ranks
from tests.surgery.nets import SmallNet

ROOT = Path(__file__).resolve().parents[2]


def _evil(folder: Path) -> dict[str, Path]:
    """The two files of issue 7: a tdump checkpoint naming os.system, a wrapped dict naming subprocess.run."""
    sd = {"w": torch.zeros(1)}
    torch.save(
        {
            "format": "tdump.checkpoint",
            "format_version": 1,
            "arch": "os.system",
            "arch_kwargs": {"command": "touch X"},
            "plan": {},
            "rounds": 0,
            "state_dict": sd,
        },
        folder / "evil1.pt",
    )
    torch.save(
        {"state_dict": sd, "arch": "subprocess.run", "arch_kwargs": {"args": ["touch", "Y"]}},
        folder / "evil2.pt",
    )
    return {"evil1": folder / "evil1.pt", "evil2": folder / "evil2.pt"}


@pytest.fixture
def registry() -> Iterator[None]:
    before = dict(_arch._USER)
    yield
    _arch._USER.clear()
    _arch._USER.update(before)


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run ``tdump ARGS`` in this process through the console-script entry point."""
    return run_main(monkeypatch, capsys, *args)


@pytest.mark.parametrize("which", ["evil1", "evil2"])
def test_file_names_nothing_that_runs(
    which: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _evil(tmp_path)[which]
    for load in (surgery.load, tdump.load):
        with pytest.raises(CheckpointError, match=r"not a registered model builder.*pass --arch"):
            load(path)
    ranks = write_ranks(tmp_path / "ranks.parquet", random_scores(SmallNet()))
    code, _, err = cli(
        monkeypatch, capsys, "prune", str(path), str(ranks), "-o", "out.pt", "--count", "1"
    )
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "not a registered model builder" in err
    # a user-typed --arch is imported, but checked before it is called
    with pytest.raises(ConfigError, match=r"not an nn\.Module class or a model builder"):
        surgery.load(path, arch="os.system")
    with pytest.raises(ConfigError, match=r"not an nn\.Module class or a model builder"):
        surgery.load(path, arch="subprocess.run")
    assert sorted(os.listdir(tmp_path)) == ["evil1.pt", "evil2.pt", "ranks.parquet"]


def test_training_script_refuses_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/train.py --init: exit 1 with one `error:` line, nothing created."""
    files = _evil(tmp_path)
    # the example training script, in this process (its main() as `python examples/train.py` runs it)
    monkeypatch.chdir(tmp_path)
    script = runpy.run_path(str(ROOT / "examples/train.py"), run_name="train_example")
    for name in ("evil1", "evil2"):
        argv = [
            "--init",
            str(files[name]),
            "--data",
            "digits",
            "--train-limit",
            "8",
            "--test-limit",
            "8",
        ]
        with pytest.raises(SystemExit) as exit_:
            script["main"](argv)
        assert str(exit_.value.code).startswith("error:") and "not a registered" in str(
            exit_.value.code
        )
    assert sorted(os.listdir(tmp_path)) == ["evil1.pt", "evil2.pt"]


def test_arch_override_register_and_kwargs(tmp_path: Path, registry: None) -> None:
    model = SmallNet(num_classes=3)
    surgery.save(
        tmp_path / "s.pt", model, arch="tests.surgery.nets.SmallNet", arch_kwargs={"num_classes": 3}
    )
    with pytest.raises(
        CheckpointError, match=r"'tests\.surgery\.nets\.SmallNet', which is not a registered"
    ):
        surgery.load(tmp_path / "s.pt")
    assert surgery.load(tmp_path / "s.pt", "tests.surgery.nets.SmallNet").fc.out_features == 3
    assert surgery.load(tmp_path / "s.pt", SmallNet).fc.out_features == 3  # the class itself
    surgery.register_arch("tests.surgery.nets.SmallNet", SmallNet)
    back = surgery.load(tmp_path / "s.pt")
    torch.testing.assert_close(back.fc.weight, model.fc.weight, rtol=0, atol=0)
    # --arch overrides the file's arch (here: a tdump checkpoint naming os.system)
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    torch.save({**raw, "arch": "os.system"}, tmp_path / "o.pt")
    over = surgery.load(tmp_path / "o.pt", "tests.surgery.nets.SmallNet", {"num_classes": 3})
    assert any("overrides" in n for n in surgery.provenance(over).notes)
    # file kwargs go only to allowed builders, as plain values; never a download
    torch.save(
        {
            "state_dict": model.state_dict(),
            "arch": "resnet18",
            "arch_kwargs": {"weights": "DEFAULT"},
        },
        tmp_path / "w.pt",
    )
    with pytest.raises(CheckpointError, match="would download weights"):
        surgery.load(tmp_path / "w.pt")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_bad_checkpoints_one_line_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = SmallNet()
    surgery.save(tmp_path / "good.pt", good, arch="torchvision.models.resnet18")
    raw = dict(torch.load(tmp_path / "good.pt", weights_only=True))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(bytes(range(7, 250)) * 3)
    whole = (tmp_path / "good.pt").read_bytes()  # a save cut short: the zip's directory is missing
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    cases = {
        "noarch": ({k: v for k, v in raw.items() if k != "arch"}, "without 'arch'"),
        "v1": ({**raw, "format_version": "v1"}, "'format_version' should be an integer"),
        "arch_int": ({**raw, "arch": 5}, "'arch' should be a string"),
        "kwargs_list": ({**raw, "arch_kwargs": [1]}, "'arch_kwargs' should be a dict"),
        "plan": ({**raw, "plan": {"stem": 3}}, "plan['stem']"),
        "state": ({**raw, "state_dict": {"w": 1}}, "'state_dict' should be a dict of tensors"),
        "rounds": ({**raw, "rounds": "2"}, "'rounds' should be a non-negative integer"),
        "kwargs_obj": ({**raw, "arch_kwargs": {"num_classes": torch.ones(1)}}, "plain values"),
    }
    for name, (obj, _) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    needles = {
        "empty": "is empty (0 bytes)",
        "random": "neither the zip archive nor the pickle",
        "truncated": "looks truncated (a zip archive that ends early",
    }
    needles.update({k: v[1] for k, v in cases.items()})
    ranks = write_ranks(tmp_path / "ranks.parquet", random_scores(good))
    before = _digest(tmp_path)
    for name, needle in needles.items():
        out = tmp_path / f"out-{name}.pt"
        code, _, err = cli(
            monkeypatch,
            capsys,
            "prune",
            str(tmp_path / f"{name}.pt"),
            str(ranks),
            "-o",
            str(out),
            "--count",
            "1",
        )
        assert code == 1, (name, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, (name, err)
        assert needle in err, (name, err)
        assert not out.exists()
    assert _digest(tmp_path) == before  # inputs unchanged, no partial files


def test_module_versions_survive(tmp_path: Path) -> None:
    """MNASNet needs its state_dict's _metadata (versions): kept through save, prefixes and load."""
    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    arch = "torchvision.models.mnasnet0_5"
    tdump.save(model, tmp_path / "m.pt", arch=arch, arch_kwargs={"num_classes": 4})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["state_dict"]._metadata[""]["version"] == 2
    back = tdump.load(tmp_path / "m.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    sd = model.state_dict()
    ddp = type(sd)(("module." + k, v) for k, v in sd.items())
    ddp._metadata = type(sd._metadata)(  # type: ignore[attr-defined]
        ("module" + ("." + k if k else ""), v)
        for k, v in sd._metadata.items()  # type: ignore[attr-defined]
    )
    torch.save({"model": ddp}, tmp_path / "ddp.pt")
    again = tdump.load(tmp_path / "ddp.pt", arch=arch).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    # a module refusing its own state (an unknown version) is one line, not a traceback
    sd._metadata[""]["version"] = 7  # type: ignore[attr-defined]
    torch.save(sd, tmp_path / "v7.pt")
    with pytest.raises(CheckpointError, match=r"does not load into .*version") as err:
        tdump.load(tmp_path / "v7.pt", arch=arch)
    assert "\n" not in str(err.value)


def test_written_with_the_usual_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        tdump.save(SmallNet(), tmp_path / "a.pt", arch="torchvision.models.resnet18")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".tdump-*"))


def test_namespace_is_all() -> None:
    public = [n for n in dir(surgery) if not n.startswith("_")]
    assert sorted(public) == sorted(surgery.__all__)
    for leaked in ("Any", "nn", "os", "copy"):
        assert not hasattr(surgery, leaked), leaked
    assert issubclass(CheckpointError, TdumpError)
