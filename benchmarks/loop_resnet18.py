"""The seed's experiment, with tdump loop: ResNet18 on Fashion-MNIST, many rounds, taylor vs l1.

For each criterion, ``tdump loop examples/loop_train.py`` trains a ResNet18 (32x32
inputs) for ``--steps`` under capture, then runs ``--rounds - 1`` rounds of rank ->
prune ``--ratio`` of the channels (residual groups included) -> fine-tune for
``--finetune-steps``. The reference is the unpruned ResNet18 trained, without
capture, for the same total number of steps as a whole loop. Writes
``<out>/<name>.txt`` (command, tables, stage costs, reference, verdict),
``<out>/<name>.json`` and ``<out>/<name>.png`` (the criteria on the seed's figure;
``--name`` defaults to ``loop_resnet18``). The loops run one after the other unless
``--parallel``. ``--criteria taylor,taylor:full`` compares the loop's default capture
for Taylor (the ReLUs' Taylor term at the source) with ``--full-tensors``.

Run: ``.venv/bin/python benchmarks/loop_resnet18.py [--rounds 9] [--ratio 0.15]
[--steps 4700] [--finetune-steps 940] [--batch-size 128] [--device cuda]``
(defaults: 10 + 8 x 2 epochs of batch 128; hours on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRAIN = "examples/loop_train.py"
ARCH = ["--arch", "torchvision.models.resnet18", "--arch-kwargs", '{"num_classes": 10}']


def loop_cmd(args: argparse.Namespace, variant: str, exp: Path) -> list[str]:
    """``variant``: a criterion, or ``CRITERION:full`` for ``--full-tensors``."""
    criterion, _, full = variant.partition(":")
    return [
        sys.executable, "-m", "tdump", "loop", TRAIN, "--rounds", str(args.rounds),
        "--ratio", str(args.ratio), "--criterion", criterion,
        *(["--full-tensors"] if full == "full" else []), *ARCH,
        "--interval", str(args.interval), "--input-shape", "3,32,32",
        "--workers", str(args.workers), "--experiment", str(exp),
        "--", *train_args(args),
    ]  # fmt: skip


def train_args(args: argparse.Namespace) -> list[str]:
    return [
        "--data", args.data, "--steps", str(args.steps),
        "--finetune-steps", str(args.finetune_steps), "--batch-size", str(args.batch_size),
        "--test-limit", "10000", "--device", args.device, "--lr", str(args.lr),
    ]  # fmt: skip


def stage_costs(exp: Path, rows: list[dict[str, Any]]) -> str:
    """Seconds of the train and rank stages and the dumps' bytes, summed over the rounds."""
    walls = [r.get("wall") or {} for r in rows]
    dumps = [
        sum(
            f.stat().st_size
            for f in (exp / f"round_{r['round']:03d}" / "dump.zarr").rglob("*")
            if f.is_file()
        )
        for r in rows
    ]
    return (
        f"stages over all rounds: train {sum(w.get('train', 0.0) for w in walls):.1f} s, "
        f"rank {sum(w.get('rank', 0.0) for w in walls):.1f} s; dumps {sum(dumps) / 1e6:.1f} MB "
        f"(round 0: {dumps[0] / 1e6:.1f} MB)"
    )


def reference(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The unpruned model trained for as many steps as a whole loop, no capture."""
    total = args.steps + (args.rounds - 1) * args.finetune_steps
    targs = train_args(args)
    targs[targs.index("--steps") + 1] = str(total)
    cmd = [sys.executable, TRAIN, *targs]
    env = {**os.environ, "TDUMP_OUT": str(out / "reference.pt")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    found = re.search(r"(\d+) steps, accuracy ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return {
        "command": shlex.join(["python", *cmd[1:]]),
        "steps": int(found.group(1)),
        "accuracy": float(found.group(2)),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["round   params   params%   FLOPs    acc     drop(pt)  removed"]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {r['params'] / 1e6:7.2f}M {100 * r['params_ratio']:8.1f} "
            f"{r['flops'] / 1e6:7.1f}M {r['accuracy']:.4f} {100 * r['accuracy_drop']:+8.2f} "
            f"{r['removed'] if r['removed'] is not None else '-':>8}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="rounds, round 0 included")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=4700)
    p.add_argument("--finetune-steps", type=int, default=940)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--interval", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--criteria", default="taylor,l1")
    p.add_argument("--parallel", action="store_true", help="run the loops side by side")
    p.add_argument("--work", default="out/bench_loop", help="experiments (dumps) go here")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="loop_resnet18", help="stem of the result files")
    args = p.parse_args()

    work, out = ROOT / args.work, ROOT / args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    exps = {c: work / f"{c.replace(':', '-')}-{stamp}" for c in args.criteria.split(",")}
    t0 = time.perf_counter()
    procs = []
    for criterion, exp in exps.items():
        cmd = loop_cmd(args, criterion, exp)
        print("$", shlex.join(["tdump", *cmd[3:]]), flush=True)
        log = open(f"{exp}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        if not args.parallel:
            procs[-1][0].wait()
    for proc, log in procs:
        proc.wait()
        log.close()
    ref = reference(args, work)
    seconds = time.perf_counter() - t0

    sys.path.insert(0, str(ROOT))
    from tdump.loop import Experiment
    from tdump.loop._plot import plot_rounds

    results = {c: Experiment.open(e).rows() for c, e in exps.items()}
    report = [
        f"# benchmarks/loop_resnet18.py {shlex.join(sys.argv[1:])}",
        f"device: {args.device}; total wall time {seconds / 60:.1f} min",
        f"reference: unpruned resnet18, {ref['steps']} steps, accuracy {ref['accuracy']:.4f} "
        f"({ref['seconds']} s): {ref['command']}",
    ]
    for c, rows in results.items():
        report += [
            "",
            f"## {c}: {shlex.join(['tdump', *loop_cmd(args, c, exps[c])[3:]])}",
            table(rows),
            stage_costs(exps[c], rows),
        ]
        best = [r for r in rows if ref["accuracy"] - r["accuracy"] <= 0.005]
        smallest = min(best, key=lambda r: r["params"]) if best else None
        if smallest:
            report.append(
                f"smallest model within 0.5 points of the reference: round {smallest['round']}, "
                f"{rows[0]['params'] / smallest['params']:.1f}x fewer parameters, "
                f"accuracy {smallest['accuracy']:.4f} vs {ref['accuracy']:.4f}"
            )
        else:
            report.append("no round is within 0.5 points of the reference")
    text = "\n".join(report) + "\n"
    print(text)
    (out / f"{args.name}.txt").write_text(text)
    (out / f"{args.name}.json").write_text(
        json.dumps({"reference": ref, "rounds": results}, indent=1)
    )
    plot_rounds(list(results.items()), out / f"{args.name}.png", title="ResNet18 on Fashion-MNIST")


if __name__ == "__main__":
    main()
