"""Two pruning rounds from plain scripts, through the CLI, for torchvision families.

Per model, what a user types (``benchmarks/_plain_train.py`` is the training script):

    tdump record --out dump.zarr --interval 1 _plain_train.py -- --arch A --out ckpt.pt
    tdump rank dump.zarr -o ranks.parquet
    tdump prune ckpt.pt ranks.parquet -o pruned.pt --ratio 0.2
    tdump record --out dump2.zarr --interval 1 _plain_train.py -- --init pruned.pt --out ft.pt
    tdump rank dump2.zarr -o ranks2.parquet
    tdump prune ft.pt ranks2.parquet --like pruned.pt -o pruned2.pt --ratio 0.2

then ``tdump.load("pruned2.pt")`` runs a batch. Prints one row per model: parameters
of the trained, round-1 and round-2 models, the conv/Linear layers ranked in each
round, the layers left unscored (from the ranks' notes), seconds, and the first
failing stage with its last line of output. Defaults (no recording reduction, 3 steps
of batch 4 at 64x64, every step saved) keep each model under a minute on 2 cores.

Run: ``.venv/bin/python benchmarks/two_rounds.py [NAME ...]`` (about 15 minutes for
the default list).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "_plain_train.py"
TDUMP = str(Path(sys.executable).parent / "tdump")
#: One or two per family; ``(name, input size)``.
MODELS = [
    ("resnet18", 64),
    ("resnext50_32x4d", 64),
    ("wide_resnet50_2", 64),
    ("vgg11_bn", 64),
    ("alexnet", 64),
    ("squeezenet1_0", 64),
    ("densenet121", 64),
    ("googlenet", 64),
    ("inception_v3", 299),
    ("mobilenet_v2", 64),
    ("mobilenet_v3_small", 64),
    ("mnasnet0_5", 64),
    ("shufflenet_v2_x0_5", 64),
    ("efficientnet_b0", 64),
    ("efficientnet_v2_s", 64),
    ("regnet_x_400mf", 64),
    ("regnet_y_400mf", 64),
    ("convnext_tiny", 64),
    ("swin_t", 64),
    ("maxvit_t", 224),  # its partition size 7 needs 224x224 inputs
    ("vit_b_32", 64),
]
#: Builder keywords for models whose defaults need 224x224 inputs (the training script
#: gets them; round 1's prune infers ``image_size`` from the position embedding, round 2
#: reads it from ``pruned.pt``).
KWARGS = {"vit_b_32": {"image_size": 64}}
#: state_dict entries that are not parameters
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return lines[-1][:160] if lines else f"exit {proc.returncode}"


def _ranked(work: Path, ranks: str) -> tuple[int, int]:
    """Layers ranked, and layers the ranks' notes left without scores."""
    from tdump.analyze import read_ranks

    df = read_ranks(work / ranks)
    return df["layer"].nunique(), len(df.attrs["tdump"].get("skipped") or {})


def one(name: str, size: int, root: Path) -> dict[str, object]:
    """Both rounds for ``name`` in ``root / name``; a row of the table."""
    work = root / name
    work.mkdir()
    train = [str(TRAIN), "--", "--size", str(size)]
    if size > 200:  # Inception v3 (299x299) and MaxViT (224x224): fewer, smaller steps
        train += ["--batch", "2", "--steps", "2"]
    build = ["--arch", name, "--kwargs", json.dumps(KWARGS.get(name, {}))]
    ratio = ["--ratio", "0.2"]
    first = [*train, *build, "--out", "ckpt.pt"]
    second = [*train, "--init", "pruned.pt", "--out", "ft.pt"]
    out2 = ["-o", "pruned2.pt"]
    stages = [
        ("record", ["record", "--out", "dump.zarr", "--interval", "1", *first]),
        ("rank", ["rank", "dump.zarr", "-o", "ranks.parquet", "--quiet"]),
        ("prune", ["prune", "ckpt.pt", "ranks.parquet", "-o", "pruned.pt", *ratio]),
        ("record 2", ["record", "--out", "dump2.zarr", "--interval", "1", *second]),
        ("rank 2", ["rank", "dump2.zarr", "-o", "ranks2.parquet", "--quiet"]),
        ("prune 2", ["prune", "ft.pt", "ranks2.parquet", "--like", "pruned.pt", *ratio, *out2]),
    ]
    row: dict[str, object] = {"model": name, "failed": None}
    t0 = time.perf_counter()
    for stage, args in stages:
        proc = subprocess.run([TDUMP, *args], cwd=work, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            row["failed"] = f"{stage}: {_last_line(proc)}"
            break
    row["seconds"] = time.perf_counter() - t0
    if row["failed"] is None:
        row.update(_summary(work, size))
    shutil.rmtree(work, ignore_errors=True)
    return row


def _summary(work: Path, size: int) -> dict[str, object]:
    import torch

    import tdump

    sd = torch.load(work / "ckpt.pt", weights_only=True)
    params = [sum(v.numel() for k, v in sd.items() if not k.endswith(_BUFFERS))]
    for ckpt in ("pruned.pt", "pruned2.pt"):
        with warnings.catch_warnings():  # torchvision's init-weights FutureWarnings
            warnings.simplefilter("ignore", FutureWarning)
            model = tdump.load(str(work / ckpt)).eval()
        params.append(sum(q.numel() for q in model.parameters()))
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    layers1, skipped1 = _ranked(work, "ranks.parquet")
    layers2, skipped2 = _ranked(work, "ranks2.parquet")
    return {
        "params": params,
        "layers": (layers1, layers2),
        "skipped": (skipped1, skipped2),
        "runs": tuple(out.shape) == (1, 10),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="torchvision model names (default: the list)")
    args = p.parse_args()
    sizes = dict(MODELS)
    chosen = [(m, sizes.get(m, 64)) for m in args.models] if args.models else MODELS
    print(
        f"{'model':<20} {'params: trained -> round 1 -> round 2':>40} {'ranked':>9} "
        f"{'unscored':>9} {'s':>5}  status"
    )
    passed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in chosen:
            row = one(name, size, Path(tmp))
            if row["failed"]:
                print(
                    f"{name:<20} {'':>40} {'':>9} {'':>9} {row['seconds']:>5.0f}  "
                    f"FAILED at {row['failed']}",
                    flush=True,
                )
                continue
            n0, n1, n2 = row["params"]  # type: ignore[misc]
            ok = bool(row["runs"]) and n2 < n1 < n0
            passed += ok
            lay, skip = row["layers"], row["skipped"]
            print(
                f"{name:<20} {n0 / 1e6:>14.2f}M -> {n1 / 1e6:>7.2f}M -> {n2 / 1e6:>7.2f}M "
                f"{lay[0]:>4}/{lay[1]:<4} {skip[0]:>4}/{skip[1]:<4} {row['seconds']:>5.0f}  "
                f"{'ok' if ok else 'NOT SMALLER or does not run'}",
                flush=True,
            )
    print(f"{passed} of {len(chosen)} models: two rounds from plain scripts, each smaller, runs")


if __name__ == "__main__":
    main()
