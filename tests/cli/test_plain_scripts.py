"""Plain scripts whose activations are not modules named ``relu``, with every default.

A user's ``nn.Sequential`` names its ReLUs ``2``, ``4``...; the PyTorch tutorial's CNN
calls ``F.relu``. Recorded with no ``--include``, both must rank and prune.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import tdump
from tdump._format import StoreReader

ROOT = Path(__file__).resolve().parents[2]
TDUMP = str(Path(sys.executable).with_name("tdump"))
SCRIPT = ROOT / "tests" / "capture" / "scripts" / "train_functional.py"


def _tdump(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TDUMP, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_functional_relu_cnn_records_ranks_and_prunes_with_the_defaults(tmp_path: Path) -> None:
    dump, ckpt = str(tmp_path / "d.zarr"), str(tmp_path / "ckpt.pt")
    res = _tdump("record", "--out", dump, "--interval", "2", str(SCRIPT), "--", ckpt)
    assert res.returncode == 0, res.stderr
    assert "no activation modules" in res.stderr  # says what it records instead
    names = StoreReader(dump).tensor_names("train")
    assert {"conv1.output_0", "conv1.output_0.grad", "conv2.output_0.grad"} <= set(names)
    ranks = str(tmp_path / "ranks.parquet")
    res = _tdump("rank", dump, "-o", ranks, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["layers"] == 2
    out = str(tmp_path / "pruned.pt")
    res = _tdump("prune", ckpt, ranks, "--arch", f"{SCRIPT}:Net", "--count", "3", "-o", out,
                 "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["input_shape"] == [3, 16, 16]  # the recorded input's, not 3x224x224
    assert summary["flops_after"] < summary["flops_before"]
    model = tdump.load(out, arch=f"{SCRIPT}:Net")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(convs) == 6 + 8 - 3


def test_unet_up_conv_is_ranked_and_pruned_with_the_defaults(tmp_path: Path) -> None:
    """The up-conv's output goes into ``torch.cat`` before any ReLU: the default
    selection records it, so rank scores it with no advice and prune shrinks it."""
    script = ROOT / "tests" / "capture" / "scripts" / "train_unet.py"
    dump, ckpt = str(tmp_path / "d.zarr"), str(tmp_path / "ckpt.pt")
    res = _tdump("record", "--out", dump, "--interval", "2", str(script), "--", ckpt)
    assert res.returncode == 0, res.stderr
    assert "1 layer(s) reach no activation module alone" in res.stderr, res.stderr
    names = set(StoreReader(dump).tensor_names("train"))
    assert {"up.output_0", "up.output_0.grad"} <= names
    ranks = str(tmp_path / "ranks.parquet")
    res = _tdump("rank", dump, "-o", ranks, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["layers"] == 4  # enc, mid, up, dec; the head's channels are the classes
    unscored = [n for n in report["notes"] if "no taylor scores" in n]
    assert len(unscored) == 1 and "(head)" in unscored[0], unscored
    out = str(tmp_path / "pruned.pt")
    res = _tdump("prune", ckpt, ranks, "--arch", f"{script}:Net", "--ratio", "0.5",
                 "--scope", "per-layer", "-o", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    model = tdump.load(out, arch=f"{script}:Net")
    assert model.up.out_channels == 3  # half of each layer's channels, the up-conv's too
    assert model(torch.randn(2, 2, 16, 16)).shape == (2, 3, 16, 16)
