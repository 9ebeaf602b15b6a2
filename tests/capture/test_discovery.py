"""How auto capture (`tdump record`) finds the model: fx traces, decoys, tdump.load."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
import torchvision

import tdump.surgery as surgery
from tdump._format import StoreReader
from tdump.capture import HookConfig, run_script
from tdump.capture._config import with_default_selection

from .conftest import SCRIPTS


def _record(script: str, out: str, args: list[str] | None = None, **settings: object) -> int:
    cfg = HookConfig.from_dict({"out": out, "save_interval": 1, "include_regex": ".*", **settings})
    return run_script(script, list(args or []), cfg)


def _record_defaults(script: str, out: str, args: list[str]) -> int:
    """As ``tdump record --interval 1`` does: the default selection."""
    cfg = HookConfig.from_dict(with_default_selection({"out": out, "save_interval": 1}))
    return run_script(script, args, cfg)


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


def _scores(table, layers: tuple[str, ...]) -> np.ndarray:
    return np.concatenate(
        [table[table.layer == layer].sort_values("channel")["score"].to_numpy() for layer in layers]
    )


def _plain_taylor_weight(net_class: type) -> np.ndarray:
    """Molchanov 2019's score of c1, c2, c3 of ``train_weight_norm.py``'s run, from plain
    weights: the script's seed, weights and batches replayed without weight_norm."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = net_class()
    with torch.no_grad():
        for p_ in net.parameters():
            p_.mul_(1 + torch.rand_like(p_))
        net(torch.zeros(1, 1, 6, 6))  # the old hook fills c2.weight at a forward
    convs = [net.c1, net.c2, net.c3]
    ws = [c.weight.detach().clone().requires_grad_() for c in convs]
    fc_w = net.fc.weight.detach()
    sums = []
    for _ in range(3):
        x = torch.randn(4, 1, 6, 6)
        h = F.relu(F.conv2d(x, ws[0], convs[0].bias, padding=1))
        h = F.relu(
            F.conv2d(
                h + F.relu(F.conv2d(h, ws[1], convs[1].bias, padding=1)),
                ws[2],
                convs[2].bias,
                padding=1,
            )
        )
        loss = F.cross_entropy(
            F.linear(h.mean((2, 3)), fc_w, net.fc.bias), torch.tensor([0, 1, 2, 0])
        )
        grads = torch.autograd.grad(loss, ws)
        sums.append(
            torch.cat([(w * g).double().flatten(1).sum(1) for w, g in zip(ws, grads, strict=True)])
        )
    return (torch.stack(sums) ** 2).mean(0).detach().numpy()


def test_weight_normed_model_records_its_layers_and_ranks_by_weights(tmp_path, capfd) -> None:
    """weight_norm: reading ``conv.weight`` runs a module (not the model); the convs'
    outputs are recorded as pre-activations under their own names and types; ``l1``
    ranks the weight made of g and v (checked against torch's), in two rounds."""
    import sys

    from tdump.analyze import rank

    script = str(SCRIPTS / "train_weight_norm.py")
    out, saved = str(tmp_path / "wn.zarr"), tmp_path / "wn.pt"
    assert _record_defaults(script, out, ["--save", str(saved)]) == 0
    assert "tdump: capturing Net (" in capfd.readouterr().err
    r = StoreReader(out)
    names = set(r.tensor_names("train"))
    assert {"c1.output_0", "c2.output_0", "c3.output_0", "c1.output_0.grad"} <= names
    assert not any(".parametrizations.weight.output" in n for n in names)
    types = {k: v["type"] for k, v in r.meta()["modules"].items()}
    assert types["c1"] == types["c3"] == "torch.nn.modules.conv.Conv2d"
    sys.path.insert(0, str(SCRIPTS))
    try:
        from train_weight_norm import Net
    finally:
        sys.path.remove(str(SCRIPTS))
    model = Net()
    model.load_state_dict(torch.load(saved, weights_only=True))
    model(torch.zeros(1, 1, 6, 6))  # the old hook computes c2.weight from g and v at a forward
    table = rank(out, criterion="l1", normalize=False, progress=False)
    for layer in ("c1", "c2", "c3"):
        want = getattr(model, layer).weight.detach().double().abs().flatten(1).sum(1)
        got = table[table.layer == layer].sort_values("channel")["score"].to_numpy()
        assert np.allclose(got, want.numpy(), rtol=1e-6), layer
    # taylor-weight: w * dL/dw from the recorded g, v and their gradients, against a plain
    # (not weight-normed) copy's own weight gradients on the script's batches (lr 0)
    weighted = rank(out, criterion="taylor-weight", normalize=False, progress=False)
    assert np.allclose(_plain_taylor_weight(Net), _scores(weighted, ("c1", "c2", "c3")), rtol=1e-4)
    taylor = rank(out, progress=False)
    assert set(taylor.layer) == {"c1", "c2", "c3"}
    # round 2: the script starts from the pruned checkpoint through tdump.load
    pruned, _ = surgery.prune(model, taylor, ratio=0.3)
    surgery.save(tmp_path / "p1.pt", pruned, arch=Net)
    out2 = str(tmp_path / "wn2.zarr")
    assert _record_defaults(script, out2, ["--init", str(tmp_path / "p1.pt")]) == 0
    assert "tdump: capturing Net (" in capfd.readouterr().err
    again = rank(out2, progress=False)
    assert {layer: int((again.layer == layer).sum()) for layer in ("c1", "c3")} == {
        "c1": pruned.c1.out_channels,
        "c3": pruned.c3.out_channels,
    }


def test_a_constructor_only_conv_subclass_is_recorded_and_ranked_as_a_conv(tmp_path) -> None:
    """torchvision's video convs (``Conv3DSimple(nn.Conv3d)``) only add a constructor: the
    module tree names them as the torch layer, so ranking scores them (taylor against
    numpy on the recorded ReLU output and gradient); a conv subclass with its own
    forward keeps its own name."""
    from tdump.analyze import rank
    from tdump.capture import Hook

    class PlainConv(torch.nn.Conv2d):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__(cin, cout, 3, padding=1)

    class OwnForward(torch.nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        PlainConv(1, 6), torch.nn.ReLU(), OwnForward(6, 5, 1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(5 * 16, 3),
    )  # fmt: skip
    out = str(tmp_path / "sub.zarr")
    with Hook(out, include_regex=r"^[13]\.output", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        for _ in range(2):
            x = torch.randn(4, 1, 4, 4)
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    r = StoreReader(out)
    types = {k: v["type"] for k, v in r.meta()["modules"].items()}
    assert types["0"] == "torch.nn.modules.conv.Conv2d"
    assert types["2"].endswith("OwnForward")
    table = rank(out, normalize=False, progress=False)
    assert set(table.layer) == {"0"}
    a = np.stack([r.array("train", "1.output_0")[i] for i in range(2)]).astype(np.float64)
    g = np.stack([r.array("train", "1.output_0.grad")[i] for i in range(2)]).astype(np.float64)
    want = np.abs((a * g).mean((3, 4))).sum((0, 1)) / 8  # mean over 2 steps x 4 examples
    got = table.sort_values("channel")["score"].to_numpy()
    assert np.allclose(got, want, rtol=1e-6)
