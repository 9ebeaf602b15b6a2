"""tdump side by side with smdebug 1.0.34 (the seed's tool): capture and ranking, same run.

Needs a virtualenv with smdebug (it wants numpy < 2, so it cannot share tdump's):
``bash benchmarks/setup_peer_venv.sh`` builds ``benchmarks/.peer-venv`` (git-ignored).

* ``--capture``: ``benchmarks/capture_overhead.py`` with the smdebug configuration added
  (the seed's custom hook: smdebug's PyTorch hook, the seed's selection, plus ReLU-output
  gradients), every configuration its own process, interleaved.
* ``--rank``: the same training run (resnet18, batch 32x3x64x64, ``--steps`` steps,
  every step saved, ReLU outputs and their gradients) recorded by each hook with its
  defaults; then, page cache dropped before each run and the runs interleaved over
  ``--rounds`` rounds: ``tdump rank`` (the whole command, default settings) against the
  seed's Taylor loop over smdebug's ``create_trial`` (a Python loop over steps and
  tensors, float64 numpy), each a fresh process; and a cold ``cat`` of the files
  ``tdump rank`` reads (the disk's limit for those bytes).
* ``--bytes``: the same 3 steps of the seed's selection recorded by each hook (every
  step saved): the stored MB per saved step, and the **lossless floor** for tdump's
  tensors of one step: per tensor the smallest of Blosc zstd-9 + byte shuffle and
  LZMA-6 over byte-shuffled planes, and for weights, biases and BN statistics also the
  same codecs over the XOR with the previous step's bits (interval 1 is where that
  temporal delta gains most). It shows how far any lossless default could go.

    bash benchmarks/setup_peer_venv.sh
    python benchmarks/peer_smdebug.py --capture --rank --bytes --save benchmarks/results/peer_smdebug.txt
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    SEED_INCLUDE,
    cat_seconds,
    compile_tdump,
    drop_cache,
    files_of,
    timed,
    train_child,
)

HERE = Path(__file__).resolve().parent
DEFAULT_PEER = HERE / ".peer-venv" / "bin" / "python"

#: The seed's Taylor read loop over an smdebug trial (runs in the peer venv).
SEED_LOOP = r"""
import re, sys, time
import numpy as np
from smdebug.trials import create_trial
t0 = time.perf_counter()
trial = create_trial(sys.argv[1])
names = [n for n in trial.tensor_names() if re.search(r"relu_output_\d+$", n) and not n.startswith("gradient/")]
acc = {}
for step in trial.steps():
    for n in names:
        a = trial.tensor(n).value(step)
        g = trial.tensor("gradient/" + n).value(step)
        v = np.abs((a.astype(np.float64) * g).mean(axis=(2, 3))).sum(axis=0)
        acc[n] = acc.get(n, 0) + v
print(len(names), len(trial.steps()), time.perf_counter() - t0)
"""


def dir_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def record(
    hook: str, python: str, out: Path, steps: int, env: dict[str, str], include: str = ".*relu"
) -> None:
    train_child(
        ["--hook", hook, "--interval", "1", "--steps", str(steps), "--include", include,
         "--keep", "--out", str(out)],
        python, env,
    )  # fmt: skip


def _plane_bytes(a: np.ndarray) -> bytes:
    """``a``'s bytes regrouped by byte position (all first bytes, then all second ...)."""
    planes = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
    return np.ascontiguousarray(planes.T).tobytes()


def lossless_sizes(a: np.ndarray) -> dict[str, int]:
    """Stored bytes of ``a`` under each strong lossless codec of the floor's panel."""
    from numcodecs import Blosc

    a = np.ascontiguousarray(a)
    zstd = Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE, typesize=a.dtype.itemsize)
    return {
        "zstd-9 shuffle": len(zstd.encode(a)),
        "lzma-6 shuffle": len(lzma.compress(_plane_bytes(a), preset=6)),
    }


#: Collections whose values at one step are close to the previous step's (the temporal delta).
SLOW_CHANGING = ("weights", "biases", "running_stats")


def lossless_floor(dump: Path) -> tuple[dict[str, tuple[float, float, str]], float, float]:
    """Per collection (raw MB, floor MB, best codec) for record 1 of ``dump``; total floor MB
    with the temporal delta, and without it (each record on its own)."""
    from tdump._format import StoreReader

    reader = StoreReader(str(dump))
    by: dict[str, list[float]] = {}
    best_of: dict[str, dict[str, int]] = {}
    alone = 0.0
    for name in reader.tensor_names("train"):
        coll = str(reader.tensor_attrs("train", name).get("collection", "?"))
        value = np.ascontiguousarray(reader.read("train", name, 1))
        sizes = lossless_sizes(value)
        alone += min(sizes.values()) / 1e6
        if coll in SLOW_CHANGING and value.dtype.itemsize == 4:
            prev = np.ascontiguousarray(reader.read("train", name, 0))
            delta = (value.view(np.uint32) ^ prev.view(np.uint32)).view(value.dtype)
            sizes.update({f"xor-previous + {k}": v for k, v in lossless_sizes(delta).items()})
        codec = min(sizes, key=lambda k: sizes[k])
        raw_floor = by.setdefault(coll, [0.0, 0.0])
        raw_floor[0] += value.nbytes / 1e6
        raw_floor[1] += sizes[codec] / 1e6
        counts = best_of.setdefault(coll, {})
        counts[codec] = counts.get(codec, 0) + value.nbytes
    out = {
        c: (raw, floor, max(best_of[c], key=lambda k: best_of[c][k]))
        for c, (raw, floor) in by.items()
    }
    return out, sum(v[1] for v in out.values()), alone


def bytes_comparison(args: argparse.Namespace, peer_env: dict[str, str]) -> list[str]:
    work = Path(args.workdir) / "bytes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    td, sm, steps = work / "tdump.zarr", work / "smdebug", 3
    record("tdump", sys.executable, td, steps, dict(os.environ), SEED_INCLUDE)
    record("smdebug", args.peer_python, sm, steps, peer_env, SEED_INCLUDE)
    td_mb, sm_mb = dir_bytes(td) / steps / 1e6, dir_bytes(sm) / steps / 1e6
    per_coll, floor, alone = lossless_floor(td)
    lines = [
        f"bytes: the same {steps} steps (resnet18 batch 32x3x64x64, the seed's selection, every "
        "step saved) recorded by each hook with its defaults, MB per saved step:",
        f"  smdebug 1.0.34             {sm_mb:7.1f}",
        f"  tdump default              {td_mb:7.1f}   {td_mb / sm_mb:.2f}x smdebug",
        f"  lossless floor (see below) {floor:7.1f}   {floor / sm_mb:.2f}x smdebug (goal <= 0.5x)",
        f"  the floor without the delta to the previous step (each record readable on its own): "
        f"{alone:.1f} MB, {alone / sm_mb:.2f}x",
        "  the floor, per collection of one saved step (the smallest of the panel per tensor):",
        f"    {'collection':<22} {'raw MB':>7} {'floor MB':>9} {'ratio':>6}  codec that won most bytes",
    ]
    for coll, (raw, low, codec) in sorted(per_coll.items(), key=lambda kv: -kv[1][0]):
        if raw >= 0.01:
            lines.append(f"    {coll:<22} {raw:7.2f} {low:9.2f} {raw / low:6.2f}  {codec}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return lines


def rank_comparison(args: argparse.Namespace, peer_env: dict[str, str]) -> list[str]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    td, sm = work / "tdump.zarr", work / "smdebug"
    record("tdump", sys.executable, td, args.steps, dict(os.environ))
    record("smdebug", args.peer_python, sm, args.steps, peer_env)
    tdump_cmd = [sys.executable, "-c", "from tdump.cli.app import main; main()", "rank", str(td),
                 "-o", str(work / "ranks.parquet"), "--quiet"]  # fmt: skip
    seed_cmd = [args.peer_python, "-c", SEED_LOOP, str(sm)]
    files = files_of(td)
    compile_tdump()  # smdebug's modules were compiled by pip; tdump's editable ones were not
    times: dict[str, list[float]] = {"tdump rank": [], "smdebug seed loop": [], "cat": []}
    method = ""
    for r in range(args.rounds):
        order = ["tdump rank", "smdebug seed loop", "cat"]
        order = order[r % 3 :] + order[: r % 3]
        for what in order:
            method = drop_cache(td if what != "smdebug seed loop" else sm)
            if what == "tdump rank":
                times[what].append(timed(tdump_cmd))
            elif what == "smdebug seed loop":
                times[what].append(timed(seed_cmd, peer_env))
            else:
                times[what].append(cat_seconds(files))
            print(
                f"# rank round {r + 1} {what:<18} {times[what][-1]:6.2f} s",
                file=sys.stderr,
                flush=True,
            )
    t_med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"ranking: the same {args.steps}-step run recorded by each (resnet18 batch 32x3x64x64, "
        f"17 ReLU outputs + gradients, every step), page cache dropped ({method}) before each "
        f"run, {args.rounds} interleaved rounds, median [min-max] seconds, whole processes:",
        f"  stored: tdump {dir_bytes(td) / 1e9:.2f} GB (defaults), smdebug {dir_bytes(sm) / 1e9:.2f} GB",
    ]
    for k, v in times.items():
        lines.append(f"  {k:<20} {t_med[k]:6.2f} s [{min(v):.2f}-{max(v):.2f}]")
    lines.append(
        f"  tdump rank vs the seed's smdebug loop: {t_med['smdebug seed loop'] / t_med['tdump rank']:.2f}x "
        f"faster (goal >= 3x); vs a cold `cat` of its files: {t_med['cat'] / t_med['tdump rank']:.2f}x "
        "of the disk's speed (goal >= 0.8x)"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peer-python", default=str(DEFAULT_PEER), help="python of the smdebug venv")
    p.add_argument("--capture", action="store_true", help="capture overhead side by side")
    p.add_argument("--capture-args", default="", help="extra arguments for capture_overhead.py")
    p.add_argument("--rank", action="store_true", help="ranking side by side")
    p.add_argument(
        "--steps", type=int, default=60, help="recorded steps for the ranking comparison"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ranking runs")
    p.add_argument(
        "--bytes", action="store_true", help="bytes per saved step and the lossless floor"
    )
    p.add_argument("--workdir", default="/tmp/tdump-peer-bench")
    p.add_argument("--keep", action="store_true", help="keep the recorded dumps")
    p.add_argument("--save", default=None, help="also write the report to this file")
    args = p.parse_args()
    if not Path(args.peer_python).exists():
        raise SystemExit(
            f"no smdebug venv at {args.peer_python}; run bash benchmarks/setup_peer_venv.sh"
        )
    peer_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    lines = [f"$ python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"]
    if args.capture:
        cmd = [sys.executable, str(HERE / "capture_overhead.py"), "--peer-python", args.peer_python,
               *shlex.split(args.capture_args)]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit("capture_overhead.py failed")
        lines += ["", "capture:", proc.stdout.rstrip()]
    if args.rank:
        lines += ["", *rank_comparison(args, peer_env)]
    if args.bytes:
        lines += ["", *bytes_comparison(args, peer_env)]
    report = "\n".join(lines)
    print(report)
    if args.save:
        Path(args.save).write_text(report + "\n")
    print(json.dumps({"ok": True}), file=sys.stderr)


if __name__ == "__main__":
    main()
