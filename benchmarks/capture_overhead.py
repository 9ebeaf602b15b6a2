"""Capture overhead: total training time with the hook over without, each run its own process.

Setup (issue 12): torchvision resnet18, SGD steps on one fixed batch 32x3x64x64, the
seed's selection (ReLU outputs and their gradients, weights, biases, parameter
gradients, BatchNorm running stats) at save_interval 100, 10 and 1. Every
configuration runs in its own process (``benchmarks/_train_child.py``): the un-hooked
run, tdump with its defaults, optional variants, and optionally smdebug 1.0.34 (the
seed's hook, ``--peer-python``, see ``benchmarks/peer_smdebug.py``). Configurations
run interleaved, round after round, with the order rotated each round, so that
other load on the machine hits every configuration alike.

Figure = total time of the steps, **from creating the hook to the return of its
close()** (everything queued written), over the un-hooked run's in the same round;
enough steps that the writer's queue cannot hide work (200 at intervals 100 and 10,
30 at every step). Also reported: stored MB per saved step, and where a saved step's
time goes on the training thread and on the writer thread.

    python benchmarks/capture_overhead.py                    # reference run (~25 min on 2 cores)
    python benchmarks/capture_overhead.py --quick            # < 3 min: 32x32 images, fewer steps
    python benchmarks/capture_overhead.py --device cuda --quick
    python benchmarks/capture_overhead.py --variants --save benchmarks/results/capture_overhead.txt
    git archive HEAD~1 tdump | tar -x -C /tmp/base && \
        python benchmarks/capture_overhead.py --baseline-tree /tmp/base   # a change, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import train_child  # noqa: E402

#: label -> (hook, tdump settings, extra arguments of _train_child.py)
Config = tuple[str, dict[str, Any], tuple[str, ...]]
DEFAULT_CONFIGS: dict[str, Config] = {"tdump default": ("tdump", {}, ())}
VARIANTS: dict[str, Config] = {
    "tdump float32, zstd (old default)": ("tdump", {"compression": "zstd"}, ()),
    "tdump float16": ("tdump", {"storage_dtype": "float16"}, ()),
    "tdump uncompressed": ("tdump", {"compression": "none"}, ()),
    "tdump store format 1 (old layout)": ("tdump", {}, ("--store-format", "1")),
    "tdump 1 writer thread": ("tdump", {"writer_threads": 1}, ()),
    "tdump 4 writer threads": ("tdump", {"writer_threads": 4}, ()),
    # what `tdump loop` records for a Taylor criterion: the ReLUs' act*grad per example, channel
    "tdump ReLUs, reduction taylor (loop)": (
        "tdump",
        {"reduction": "taylor"},
        ("--include", ".*relu"),
    ),
}
#: Label of the ``--baseline-tree`` run.
BASELINE = "tdump default, baseline tree"
GOALS = {100: 1.02, 10: 1.15, 1: 2.0}


def run_child(
    python: str,
    hook: str,
    interval: int,
    steps: int,
    args: argparse.Namespace,
    settings: dict[str, Any],
    extra: tuple[str, ...] = (),
    tree: str | None = None,
) -> dict[str, Any]:
    out = os.path.join(args.workdir, f"{hook}-{interval}-{os.getpid()}.dump")
    cmd = [
        "--hook", hook, "--interval", str(interval), "--steps", str(steps),
        "--size", str(args.size), "--batch", str(args.batch), "--device", args.device,
        "--threads", str(args.threads), "--out", out, "--settings", json.dumps(settings),
        *extra,
    ]  # fmt: skip
    if hook == "tdump":
        cmd.append("--split")
    env = dict(os.environ)
    if hook == "smdebug":  # the peer venv must not see this repo's tdump or the caller's paths
        env.pop("PYTHONPATH", None)
    if tree is not None:  # another checkout's tdump package shadows this one's
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    return train_child(cmd, python, env)


def split_lines(res: dict[str, Any], plain_step: float) -> list[str]:
    """Where a saved step's time goes (per saved step), from one tdump run."""
    n = max(res["saved_steps"], 1)
    sp = res["split"]
    saved = [t for i, t in enumerate(res["step_s"]) if i % res["interval"] == 0]
    extra = statistics.fmean(saved) - plain_step  # means: the parts below are means too
    copy = sp.get("train: copy out of torch", 0.0) / n
    wait = sp.get("train: wait for the writer queue", 0.0) / n
    w = res["writer"]
    write = w.get("write_seconds", 0.0) / max(w.get("records", 1), 1)
    enc = sp.get("writer: encode", 0.0) / n
    chunk = sp.get("writer: chunk write (encode + fs)", 0.0) / n
    conv = sp.get("writer: to numpy / cast", 0.0) / n
    create = sp.get("writer: create arrays", 0.0) / n
    commit = sp.get("writer: commit (records arrays)", 0.0) / n
    fs = chunk - enc
    other = write - conv - chunk - commit - create
    ms = 1e3
    # with several writer threads encode and fs are summed over them: they overlap
    rest = (
        f"other {other * ms:.0f} ms" if other >= 0 else "encode and writes overlapping on threads"
    )
    return [
        f"  training thread, per saved step: {extra * ms:6.0f} ms over an un-hooked step (mean - median) = "
        f"copies out of torch {copy * ms:.0f} ms + waiting for the writer's queue {wait * ms:.0f} ms "
        f"+ hook Python and contention {(extra - copy - wait) * ms:.0f} ms",
        f"  writer thread, per record: {write * ms:6.0f} ms = to numpy/cast {conv * ms:.0f} + encode "
        f"{enc * ms:.0f} + file-system calls {fs * ms:.0f} + creating arrays {create * ms:.0f} "
        f"(first record) + commit {commit * ms:.0f} + {rest}; "
        f"{w.get('bytes_raw', 0) / max(w.get('records', 1), 1) / 1e6:.1f} MB raw/record",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32x32 images, fewer steps, 1 round")
    p.add_argument("--device", default="cpu", help="cpu or cuda (pinned, non-blocking copies)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)"
    )
    p.add_argument("--intervals", default="100,10,1")
    p.add_argument(
        "--steps", default=None, help="steps per interval, e.g. 100,100,30 (default 200,200,30)"
    )
    p.add_argument(
        "--variants",
        nargs="?",
        const="all",
        default=None,
        help="also the other storage choices: all, or words of their labels, e.g. 'format 1,float16'",
    )
    p.add_argument("--settings", default=None, help="JSON: run only this tdump configuration")
    p.add_argument("--peer-python", default=None, help="python of a venv with smdebug 1.0.34")
    p.add_argument(
        "--baseline-tree",
        default=None,
        metavar="DIR",
        help="also run tdump's defaults from another checkout's tdump package in DIR (e.g. the\n"
        "previous commit: git archive HEAD~1 tdump | tar -x -C DIR), side by side",
    )
    p.add_argument("--save", default=None, help="also write the report to this file")
    p.add_argument("--workdir", default=None, help="where dumps go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    args = p.parse_args()
    args.size = 32 if args.quick else 64
    args.batch = 32
    rounds = args.rounds or (1 if args.quick else 2)
    steps = {100: 100, 10: 50, 1: 10} if args.quick else {100: 200, 10: 200, 1: 30}
    intervals = [int(i) for i in args.intervals.split(",")]
    if args.steps:
        steps.update(zip(intervals, (int(n) for n in args.steps.split(",")), strict=True))
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="tdump-capture-bench-")
    configs: dict[str, Config] = {"un-hooked": ("none", {}, ())}
    if args.settings:
        configs[f"tdump {args.settings}"] = ("tdump", json.loads(args.settings), ())
    else:
        configs.update(DEFAULT_CONFIGS)
        if args.variants:
            words = [w.strip() for w in args.variants.split(",")]
            configs.update(
                (label, config)
                for label, config in VARIANTS.items()
                if args.variants == "all" or any(w in label for w in words)
            )
    if args.baseline_tree:
        configs[BASELINE] = ("tdump", {}, ())
    if args.peer_python:
        configs["smdebug 1.0.34"] = ("smdebug", {}, ())
    labels = list(configs)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    t_start = time.perf_counter()
    for r in range(rounds):
        for interval in intervals:
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            for label in order:
                hook, settings, extra = configs[label]
                python = args.peer_python if hook == "smdebug" else sys.executable
                tree = args.baseline_tree if label == BASELINE else None
                res = run_child(
                    python, hook, interval, steps[interval], args, settings, extra, tree
                )
                results.setdefault((label, interval), []).append(res)
                print(f"# round {r + 1} interval {interval:>3} {label:<36} {res['total_s']:7.2f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    elapsed = time.perf_counter() - t_start
    first = results[("un-hooked", intervals[0])][0]
    lines = [
        f"$ python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}",
        f"resnet18 on {first['device']}, {first['threads']} torch threads, batch {args.batch}x3x{args.size}x{args.size}, "
        f"seed selection; {rounds} round(s), configurations interleaved (order rotated each round), "
        f"each its own process; {elapsed / 60:.1f} min",
        "ratio = total time (hook creation .. close() returned) / un-hooked total, same round; "
        "mean [min-max] over rounds",
        "",
    ]
    head = f"{'configuration':<36}" + "".join(
        f" | interval {i} ({steps[i]} steps)" for i in intervals
    ) + " | MB stored per saved step"  # fmt: skip
    lines += [head, "-" * len(head)]
    ratios: dict[tuple[str, int], float] = {}
    for label in labels[1:]:
        row = f"{label:<36}"
        mb = []
        for i in intervals:
            rs = [
                h["total_s"] / b["total_s"]
                for h, b in zip(results[(label, i)], results[("un-hooked", i)], strict=True)
            ]
            ratios[(label, i)] = statistics.fmean(rs)
            cell = f"{statistics.fmean(rs):.3f} [{min(rs):.2f}-{max(rs):.2f}]"
            row += f" | {cell:<{len(f' interval {i} ({steps[i]} steps)') - 1}}"
            mb += [h["stored_bytes"] / max(h["saved_steps"], 1) / 1e6 for h in results[(label, i)]]
        row += f" | {statistics.fmean(mb):.1f}"
        lines.append(row)
    lines += [
        "",
        "CPU seconds (all threads of the process) over the un-hooked run's, same round: the",
        "work each configuration adds (on a loaded machine, spinning OpenMP threads inflate it too):",
    ]
    for label in labels[1:]:
        row = f"{label:<36}"
        for i in intervals:
            rs = [
                h["cpu_s"] / b["cpu_s"]
                for h, b in zip(results[(label, i)], results[("un-hooked", i)], strict=True)
            ]
            row += f" | interval {i}: {statistics.fmean(rs):.3f} [{min(rs):.2f}-{max(rs):.2f}]"
        lines.append(row)
    lines.append("")
    plain = {
        i: statistics.fmean(b["total_s"] / b["steps"] for b in results[("un-hooked", i)])
        for i in intervals
    }
    lines.append(
        f"{'un-hooked (s per step)':<36}" + "".join(f" | {plain[i]:.3f} s" for i in intervals)
    )
    lines.append(
        "goals (issue 12): " + ", ".join(f"<= {GOALS[i]} at {i}" for i in intervals if i in GOALS)
    )
    if args.peer_python:
        lines.append("")
        for label in labels[1:-1]:
            rel = ", ".join(
                f"{ratios[(label, i)] / ratios[('smdebug 1.0.34', i)]:.2f}x at {i}"
                for i in intervals
            )
            lines.append(f"{label} over smdebug (ratio of ratios; < 1 is ahead): {rel}")
    lines.append("")
    lines.append("where a saved step's time goes (interval 1 run, last round; per saved step):")
    i_split = 1 if 1 in intervals else intervals[-1]
    for label in labels[1:]:
        if configs[label][0] != "tdump":
            continue
        res = results[(label, i_split)][-1]
        base = results[("un-hooked", i_split)][-1]
        lines.append(f" {label}:")
        lines += split_lines(res, statistics.median(base["step_s"]))
    report = "\n".join(lines)
    print(report)
    if args.save:
        Path(args.save).write_text(report + "\n")
    if args.json:
        print(json.dumps({f"{k[0]}@{k[1]}": v for k, v in results.items()}))


if __name__ == "__main__":
    main()
