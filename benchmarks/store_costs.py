"""Where a dump's bytes and seconds go: the figures behind the capture, loop and ranking docs.

Each section prints one table, measured on this machine in this run:

1. **Bytes per saved step** of resnet18 training (batch 32x3x64x64): the seed's
   selection, ReLU outputs with gradients, and the same ReLUs reduced at the source
   (``reduction="taylor"``, what ``tdump loop`` records for a Taylor criterion).
2. **Codecs per collection** on one recorded step of the seed's selection: stored
   ratio and single-core encode / decode speed of LZ4 without shuffle (the default for
   activations and their gradients), LZ4 with byte shuffle, and zstd level 3.
3. **Creating a file** on the work directory's file system: why a record is appended
   to a shard file (store format 2) instead of getting one file per tensor.
4. **The writer inside training**: resnet18 saving the seed's selection at every step,
   store format 2 (shard files) against format 1 (a file per tensor and record) and
   no hook, interleaved: the total-time ratio (``close()`` included) and the writer
   thread's milliseconds per record.
5. **Ranking**: a ``--steps``-step ReLU dump, page cache dropped before every run,
   interleaved: a cold ``cat`` of its files, ``rank_table()`` (what the command runs)
   in a process that has already imported tdump, and the whole ``tdump rank`` command
   (interpreter start-up and imports included).

    python benchmarks/store_costs.py --save benchmarks/results/store_costs.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import SEED_INCLUDE as SEED  # noqa: E402
from _common import cat_seconds, drop_cache, files_of, run, timed, train_child  # noqa: E402


def record(out: Path, steps: int, include: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One ``_train_child.py`` run (every step saved); its JSON result."""
    return train_child(
        ["--hook", "tdump", "--interval", "1", "--steps", str(steps), "--include", include,
         "--settings", json.dumps(settings), "--keep", "--out", str(out)]
    )  # fmt: skip


def bytes_per_step(work: Path) -> list[str]:
    lines = ["1. bytes per saved step (resnet18, batch 32x3x64x64, 3 saved steps):"]
    lines.append(f"   {'selection':<44} {'raw MB':>8} {'stored MB':>10}")
    runs = [
        ("seed's selection (default settings)", SEED, {}),
        ("ReLU outputs + gradients", ".*relu", {}),
        ("ReLU, reduction='taylor' (the loop's default)", ".*relu", {"reduction": "taylor"}),
    ]
    for label, include, settings in runs:
        out = work / "seed.zarr" if include == SEED else work / "bytes.zarr"
        res = record(out, 3, include, settings)
        n = res["saved_steps"]
        raw, stored = res["writer"]["bytes_raw"] / n / 1e6, res["stored_bytes"] / n / 1e6
        lines.append(f"   {label:<44} {raw:>8.2f} {stored:>10.2f}")
        if out.name == "bytes.zarr":
            shutil.rmtree(out)
    return lines


def _by_collection(dump: Path) -> dict[str, list[np.ndarray]]:
    from tdump._format import StoreReader

    reader = StoreReader(str(dump))
    out: dict[str, list[np.ndarray]] = {}
    for name in reader.tensor_names("train"):
        coll = reader.tensor_attrs("train", name).get("collection", "?")
        out.setdefault(coll, []).append(np.ascontiguousarray(reader.read("train", name, 0)))
    return out


def codecs(dump: Path) -> list[str]:
    from numcodecs import Blosc, Zstd

    candidates = {
        "lz4 noshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.NOSHUFFLE, typesize=1),
        "lz4 shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, typesize=4),
        "zstd 3": Zstd(level=3),
    }
    Blosc.use_threads = False  # single core: the writer and each rank worker use one
    lines = ["2. codecs per collection (one recorded step of the seed's selection; single core):"]
    lines.append(f"   {'collection':<22} {'MB':>6}  " + "  ".join(f"{c:>27}" for c in candidates))
    lines.append(
        f"   {'':<22} {'':>6}  " + "  ".join(f"{'ratio enc GB/s dec GB/s':>27}" for _ in candidates)
    )
    for coll, arrays in sorted(_by_collection(dump).items()):
        raw = sum(a.nbytes for a in arrays)
        cells = []
        for codec in candidates.values():
            t0 = time.perf_counter()
            enc = [codec.encode(a) for a in arrays]
            t1 = time.perf_counter()
            for e in enc:
                codec.decode(e)
            t2 = time.perf_counter()
            stored = sum(len(e) for e in enc)
            cells.append(
                f"{raw / stored:>9.2f} {raw / (t1 - t0) / 1e9:>8.2f} {raw / (t2 - t1) / 1e9:>8.2f}"
            )
        lines.append(f"   {coll:<22} {raw / 1e6:>6.1f}  " + "  ".join(f"{c:>27}" for c in cells))
    return lines


def file_creation(work: Path, count: int = 2000) -> list[str]:
    """Per file: create + write 64 KB, then the same through a temporary file and a
    rename (how store format 1 wrote each tensor's record)."""
    payload = b"x" * 65536
    lines = [f"3. creating a file in {work} ({count} files, 64 KB each):"]
    for label, atomic in (("create + write", False), ("create + write + rename (format 1)", True)):
        folder = work / "files"
        folder.mkdir()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(count):
            path = folder / f"c.{i}.0.0"
            tmp = folder / f"c.{i}.0.0.tmp.partial" if atomic else path
            with open(tmp, "wb", buffering=0) as fh:
                fh.write(payload)
            if atomic:
                os.replace(tmp, path)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        shutil.rmtree(folder)
        lines.append(
            f"   {label:<36} {wall / count * 1e3:.3f} ms wall, {cpu / count * 1e3:.3f} ms CPU each"
        )
    lines.append("   (a format-1 saved step of the seed's selection wrote ~200 such files)")
    return lines


def writer_in_training(work: Path, steps: int = 30, rounds: int = 2) -> list[str]:
    """Interval 1 with the seed's selection: store format 2 against format 1, and no hook."""
    runs: dict[str, list[dict[str, Any]]] = {"no hook": [], "format 2": [], "format 1": []}
    for r in range(rounds):
        order = list(runs)[r % 3 :] + list(runs)[: r % 3]
        for what in order:
            hook = "none" if what == "no hook" else "tdump"
            fmt = what.split()[-1] if what != "no hook" else "0"
            child = ["--hook", hook, "--interval", "1", "--steps", str(steps),
                     "--store-format", fmt, "--out", str(work / "w.zarr")]  # fmt: skip
            runs[what].append(train_child(child))
    base = [run["total_s"] for run in runs["no hook"]]
    lines = [
        f"4. the writer inside training (seed's selection, interval 1, {steps} steps, "
        f"{rounds} interleaved rounds; the training thread keeps both cores busy):"
    ]
    for what in ("format 2", "format 1"):
        ratios = [run["total_s"] / b for run, b in zip(runs[what], base, strict=True)]
        per = [
            run["writer"]["write_seconds"] / run["writer"]["records"] * 1e3 for run in runs[what]
        ]
        layout = "shard files" if what == "format 2" else "a file per tensor and record"
        lines.append(
            f"   store {what} ({layout}): total over un-hooked {statistics.mean(ratios):.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}], writer {statistics.mean(per):.0f} ms per record "
            f"[{min(per):.0f}-{max(per):.0f}]"
        )
    return lines


_IN_PROCESS = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
import tdump.analyze as ta, pyarrow.parquet  # imports first: only the ranking is timed
from _common import drop_cache
drop_cache(__import__("pathlib").Path(sys.argv[1]))
t0 = time.perf_counter()
ta.rank_table(sys.argv[1], progress=False)  # what `tdump rank` runs
print(time.perf_counter() - t0)
"""


def ranking(work: Path, steps: int, rounds: int) -> list[str]:
    dump = work / "relu.zarr"
    record(dump, steps, ".*relu", {})
    files = files_of(dump)
    stored = sum(os.path.getsize(f) for f in files)
    cmd = [sys.executable, "-c", "from tdump.cli.app import main; main()", "rank", str(dump),
           "-o", str(work / "ranks.parquet"), "--quiet"]  # fmt: skip
    times: dict[str, list[float]] = {"cat": [], "rank_table() in process": [], "tdump rank": []}
    for r in range(rounds):
        order = list(times)[r % 3 :] + list(times)[: r % 3]
        for what in order:
            if what == "rank_table() in process":
                proc, _ = run([sys.executable, "-c", _IN_PROCESS, str(dump), str(HERE)])
                times[what].append(float(proc.stdout.strip().splitlines()[-1]))
                continue
            drop_cache(dump)
            if what == "cat":
                times[what].append(cat_seconds(files))
            else:
                times[what].append(timed(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"5. ranking a {steps}-step dump (17 ReLU outputs + gradients, every step; "
        f"{stored / 1e9:.2f} GB stored), page cache dropped before each run, "
        f"{rounds} interleaved rounds, median [min-max]:"
    ]
    for k, v in times.items():
        lines.append(
            f"   {k:<24} {med[k]:6.2f} s [{min(v):.2f}-{max(v):.2f}]   "
            f"{med['cat'] / med[k]:.2f}x of cold cat's speed"
        )
    lines.append(
        f"   start-up and imports of the command: {med['tdump rank'] - med['rank_table() in process']:.2f} s"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="/tmp/tdump-store-costs")
    p.add_argument("--steps", type=int, default=60, help="recorded steps of the ranking dump")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ranking runs")
    p.add_argument("--sections", default="1,2,3,4,5", help="which sections to run")
    p.add_argument("--save", help="also write the output to this file")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wanted = {int(s) for s in args.sections.split(",")}
    t0 = time.perf_counter()
    lines = [f"$ python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}"]
    seed = work / "seed.zarr"
    if 2 in wanted and 1 not in wanted:
        record(seed, 1, SEED, {})
    sections = {
        1: lambda: bytes_per_step(work),
        2: lambda: codecs(seed),
        3: lambda: file_creation(work),
        4: lambda: writer_in_training(work),
        5: lambda: ranking(work, args.steps, args.rounds),
    }
    for key in sorted(wanted):
        out = sections[key]()
        print("\n".join(out), flush=True)
        lines += out
    lines.append(f"# {os.cpu_count()} CPUs, {(time.perf_counter() - t0) / 60:.1f} min")
    print(lines[-1])
    shutil.rmtree(work, ignore_errors=True)
    if args.save:
        Path(args.save).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
