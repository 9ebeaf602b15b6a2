"""`tdump prune` end to end in subprocesses: dry run predictions, written checkpoints, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tdump.surgery as surgery
from tests.surgery.helpers import random_scores, write_ranks
from tests.surgery.nets import SmallNet

ROOT = Path(__file__).resolve().parents[2]
TDUMP = str(Path(sys.executable).with_name("tdump"))
ARCH = ["--arch", "tests.surgery.nets.SmallNet", "--arch-kwargs", '{"num_classes": 4}']


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TDUMP, "prune", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prune")
    torch.manual_seed(0)
    model = SmallNet()
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, d / "ckpt.pt")
    torch.save(model, d / "full.pt")
    scores = random_scores(model)
    write_ranks(d / "ranks.parquet", scores)
    write_ranks(d / "ghost.parquet", {**scores, "nope.conv": np.ones(3)})
    write_ranks(d / "short.parquet", {**scores, "b": np.ones(5)})
    return {"dir": d, "ckpt": d / "ckpt.pt", "full": d / "full.pt", "ranks": d / "ranks.parquet"}


def test_dry_run_predicts_written_checkpoint(files: dict[str, Path]) -> None:
    out = files["dir"] / "pruned.pt"
    common = [
        str(files["ckpt"]),
        str(files["ranks"]),
        *ARCH,
        "--ratio",
        "0.3",
        "--input-shape",
        "3,16,16",
        "--json",
    ]
    dry = _run(*common, "-o", str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    predicted = json.loads(dry.stdout)
    assert not out.exists() and predicted["dry_run"] and predicted["output"] is None
    assert (
        predicted["params_after"] < predicted["params_before"]
        and predicted["flops_after"] < predicted["flops_before"]
    )
    assert {r["layer"] for r in predicted["layers"]} >= {"stem", "a", "b", "dw", "fc"}
    # filters (every conv's removed outputs) besides group channels
    assert predicted["filters_before"] - predicted["filters_after"] == predicted["removed_filters"]
    assert predicted["removed_filters"] >= predicted["removed_channels"] > 0

    real = _run(*common, "-o", str(out), "--save-plan", str(files["dir"] / "plan.json"))
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["output"] == str(out)
    loaded = surgery.load(out, "tests.surgery.nets.SmallNet")
    assert surgery.count_params(loaded) == predicted["params_after"]
    convs = [m.out_channels for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(convs) == predicted["filters_after"]
    flops = sum(surgery.layer_flops(loaded, surgery.output_positions(loaded, (3, 16, 16))).values())
    assert flops == predicted["flops_after"]
    raw = torch.load(out, weights_only=True)
    assert raw["arch"] == "tests.surgery.nets.SmallNet" and raw["rounds"] == 1
    assert surgery.Plan.load(files["dir"] / "plan.json").layers
    loaded.train()
    loaded(torch.randn(2, 3, 16, 16)).sum().backward()

    table = _run(*common[:-1], "-o", str(out), "--dry-run")  # human-readable output
    assert table.returncode == 0 and "total" in table.stdout and "->" in table.stdout
    assert f"{predicted['removed_filters']} of {predicted['filters_before']} conv filters" in (
        " ".join(table.stdout.split())
    )
    assert "parameters " in table.stdout and " of ckpt.pt's, FLOPs" in table.stdout

    # round two: ranks recorded with the pruned checkpoint; rounds compose. SmallNet is not
    # a registered builder, so the file's arch is built only because --arch names it again
    ranks2 = write_ranks(files["dir"] / "ranks2.parquet", random_scores(loaded, seed=3))
    out2 = files["dir"] / "pruned2.pt"
    refused = _run(str(out), str(ranks2), "--count", "2", "-o", str(out2))
    assert refused.returncode == 1 and "not a registered model builder" in refused.stderr
    assert not out2.exists()
    second = _run(
        str(out),
        str(ranks2),
        "--arch",
        "tests.surgery.nets.SmallNet",
        "--count",
        "2",
        "-o",
        str(out2),
        "--input-shape",
        "3,16,16",
    )
    assert second.returncode == 0, second.stderr
    again = surgery.load(out2, "tests.surgery.nets.SmallNet")
    assert torch.load(out2, weights_only=True)["rounds"] == 2
    assert surgery.count_params(again) < surgery.count_params(loaded)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("ghost", "lacks"),
        ("short", "5 channels but the checkpoint has 6"),
        ("full", "weights_only"),
        ("arch", "does not match torchvision.models.resnet18"),
        ("ratio", "empty"),
        ("swapped", "the checkpoint comes first, `tdump prune CKPT RANKS`"),
        ("ckpt-twice", "ckpt.pt is a torch checkpoint, not a ranks file; make one with"),
    ],
)
def test_bad_input_one_line_nothing_written(files: dict[str, Path], case: str, needle: str) -> None:
    out = files["dir"] / f"bad-{case}.pt"
    ckpt, ranks, arch, extra = str(files["ckpt"]), str(files["ranks"]), ARCH, ["--ratio", "0.3"]
    if case in ("ghost", "short"):
        ranks = str(files["dir"] / f"{case}.parquet")
    elif case == "full":
        ckpt = str(files["full"])
    elif case == "arch":
        arch = ["--arch", "torchvision.models.resnet18"]
    elif case == "swapped":
        ckpt, ranks = ranks, ckpt
    elif case == "ckpt-twice":
        ranks = ckpt
    else:
        extra = ["--ratio", "1.0"]
    res = _run(ckpt, ranks, *arch, *extra, "-o", str(out))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error:") and needle in res.stderr
    assert not out.exists() and not list(files["dir"].glob(".tdump-*"))


def test_summary_counts_the_linear_features_it_prunes(tmp_path: Path) -> None:
    """MobileNetV3's hidden Linear (classifier.0) ranked: the summary says what it lost."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    scores = np.random.default_rng(0).uniform(0.1, 1.0, 1024)
    ranks = write_ranks(tmp_path / "ranks.parquet", {"classifier.0": scores})
    common = [str(tmp_path / "ckpt.pt"), str(ranks), "--count", "100", "--dry-run"]
    common += ["--arch", "torchvision.models.mobilenet_v3_small", "--input-shape", "3,32,32"]
    common += ["--arch-kwargs", '{"num_classes": 4}', "-o", str(tmp_path / "p.pt")]
    summary = json.loads(_run(*common, "--json").stdout)
    assert summary["linear_layers"] == 1
    assert (summary["linear_features_before"], summary["linear_features_after"]) == (1024, 924)
    assert summary["filters_before"] == summary["filters_after"]  # no conv lost a filter
    row = {r["layer"]: r for r in summary["layers"]}["classifier.0"]
    assert (row["channels_before"], row["channels_after"]) == (1024, 924)  # its outputs
    text = " ".join(_run(*common).stdout.split())
    assert (
        "= 0 of " in text
        and " conv filters (0.0%), 100 of 1024 features of 1 Linear layer and " in (text)
    )
