"""`make demo`: one round of the pruning loop, end to end, on bundled data.

record (train with capture) -> rank (Dask, no training) -> prune (surgery) ->
evaluate -> fine-tune -> evaluate. Each stage runs as its own process, exactly as a
user would type it; the commands are echoed. Outputs land in ``out/demo/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEED_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"


def run(cmd: list[str], capture: bool = False) -> str:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        sys.exit(f"demo: step failed (exit {proc.returncode}): {shlex.join(cmd)}")
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if capture:
        print(proc.stdout, end="")
        return proc.stdout
    return ""


def result_of(output: str) -> dict[str, float]:
    line = [ln for ln in output.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo")
    p.add_argument("--data", default="auto")
    p.add_argument("--steps", type=int, default=400, help="training steps of the first run")
    p.add_argument("--interval", type=int, default=25, help="capture every N steps")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of filters to prune")
    p.add_argument("--finetune-steps", type=int, default=150)
    args = p.parse_args()

    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tdump, py = str(BIN / "tdump"), sys.executable
    train = ["examples/train.py", "--data", args.data]
    arch = ["--arch", "torchvision.models.resnet18", "--arch-kwargs", '{"num_classes": 10}']

    trained = result_of(
        run(
            [
                tdump,
                "record",
                "--out",
                f"{args.out}/dump.zarr",
                "--include",
                SEED_INCLUDE,
                "--interval",
                str(args.interval),
                *train,
                "--",
                "--data",
                args.data,
                "--max-steps",
                str(args.steps),
                "--out",
                f"{args.out}/ckpt.pt",
            ],
            capture=True,
        )
    )
    run([tdump, "ls", f"{args.out}/dump.zarr"])
    run([tdump, "rank", f"{args.out}/dump.zarr", "-o", f"{args.out}/ranks.parquet"])
    run(
        [
            tdump,
            "prune",
            f"{args.out}/ckpt.pt",
            f"{args.out}/ranks.parquet",
            "-o",
            f"{args.out}/pruned.pt",
            "--ratio",
            str(args.ratio),
            *arch,
        ]
    )
    pruned = result_of(
        run([py, *train, "--init", f"{args.out}/pruned.pt", "--eval-only"], capture=True)
    )
    tuned = result_of(
        run(
            [
                py,
                *train,
                "--init",
                f"{args.out}/pruned.pt",
                "--max-steps",
                str(args.finetune_steps),
                "--lr",
                "0.01",
                "--out",
                f"{args.out}/finetuned.pt",
            ],
            capture=True,
        )
    )

    rows = [("trained", trained), ("pruned", pruned), ("pruned + fine-tuned", tuned)]
    print("\nOne round of record -> rank -> prune -> fine-tune")
    print(f"{'model':<22}{'parameters':>14}{'accuracy':>10}")
    for label, r in rows:
        print(f"{label:<22}{int(r['params']):>14,}{r['accuracy']:>10.3f}")
    print(f"\nFiles in {args.out}/: dump.zarr, ranks.parquet, ckpt.pt, pruned.pt, finetuned.pt")


if __name__ == "__main__":
    main()
