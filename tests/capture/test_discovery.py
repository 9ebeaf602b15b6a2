"""How auto capture (`tdump record`) finds the model: fx traces, decoys, tdump.load."""

from __future__ import annotations

import textwrap

import torch
import torchvision

import tdump.surgery as surgery
from tdump._format import StoreReader
from tdump.capture import HookConfig, run_script

from .conftest import SCRIPTS


def _record(script: str, out: str, args: list[str] | None = None, **settings: object) -> int:
    cfg = HookConfig.from_dict({"out": out, "save_interval": 1, "include_regex": ".*", **settings})
    return run_script(script, list(args or []), cfg)


def test_symbolic_trace_before_training_does_not_pick_a_child(tmp_path, capfd) -> None:
    out = str(tmp_path / "traced.zarr")
    assert _record(str(SCRIPTS / "train_traced.py"), out) == 0
    err = capfd.readouterr().err
    assert "tdump: capturing Sequential (390 parameters), loss CrossEntropyLoss" in err
    r = StoreReader(out)
    assert r.steps("train").tolist() == [0, 1, 2]
    names = r.tensor_names("train")
    assert "block.0.weight" in names and "head.1.weight.grad" in names
    assert "0.weight" not in names
    assert set(r.meta()["modules"]) >= {"", "block", "block.0", "head.1"}


def test_decoys_before_training(tmp_path) -> None:
    """A part called alone, an unrelated trainable module, a no-grad dry run, an fx trace."""
    out = str(tmp_path / "decoys.zarr")
    assert _record(str(SCRIPTS / "train_decoys.py"), out) == 0
    r = StoreReader(out)
    rec = r.records("train")
    assert rec["step"].tolist() == [0, 1, 2]
    assert rec["batch_size"].tolist() == [2, 2, 2]  # step 0 is the trained batch, not the dry run
    assert r.meta()["modules"][""]["type"] == "torch.nn.modules.container.Sequential"
    assert {"0.0.weight", "2.weight", "0.1.output_0.grad"} <= set(r.tensor_names("train"))
    # the step-0 activation is the real batch's (a dry run on zeros would be constant rows)
    act = r.array("train", "0.1.output_0")[0]
    assert act.shape[0] == 2 and float(act[0].std()) > 0


def test_model_loaded_from_a_pruned_checkpoint(tmp_path, capfd) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    ranks = {"layer1.0.conv1": torch.arange(64.0).numpy()}
    pruned, _ = surgery.prune(model, ranks, count=16)
    ckpt = tmp_path / "pruned.pt"
    surgery.save(ckpt, pruned, arch="torchvision.models.resnet18", arch_kwargs={"num_classes": 4})
    script = tmp_path / "finetune.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch, tdump
            model = tdump.load(sys.argv[1])
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            crit = torch.nn.CrossEntropyLoss()
            for _ in range(2):
                opt.zero_grad()
                crit(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
                opt.step()
            """
        )
    )
    out = str(tmp_path / "round2.zarr")
    assert _record(str(script), out, [str(ckpt)], include_regex=r"layer1\.0\.conv1\.weight$") == 0
    assert "tdump: capturing ResNet (" in capfd.readouterr().err
    r = StoreReader(out)
    assert "layer1.0.conv1.weight" in r.tensor_names("train")
    assert "0.weight" not in r.tensor_names("train")
    assert r.array("train", "layer1.0.conv1.weight").shape[1:] == (48, 64, 3, 3)
    assert r.meta()["modules"][""]["type"] == "torchvision.models.resnet.ResNet"
