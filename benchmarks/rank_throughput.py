"""Throughput and memory of `tdump rank` on dumps bigger than the workers' memory.

Makes a dump from resnet18 (batch 32, 3x64x64: ReLU outputs and their gradients,
every step, via ``tdump.capture.Hook``), replicates its real records to ``--size-gb``
logical float32 GB (dump A) and ``--large-factor`` times that (dump B, several times
the per-worker memory limit), then measures, with the page cache dropped
(``/proc/sys/vm/drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)`` per file):

* seconds and GB/s (stored and logical) of the Taylor ranking with 1 and 2 worker
  processes (a ``distributed.LocalCluster`` with ``--memory-limit`` per worker);
* the seed's way: one Python loop over steps reading one tensor at a time with numpy;
* raw sequential read speed of the same files (``cat > /dev/null``) and the codec's own
  single-core decompression speed; the binding limit is min(disk, workers x codec);
* peak RSS (all processes together, and the largest single process) for both sizes.

Run: ``python benchmarks/rank_throughput.py --size-gb 2`` (about 6-8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from _common import drop_cache, files_of  # noqa: E402


# --------------------------------------------------------------------------- sizes
def _is_chunk(f: str) -> bool:
    """A chunk file: ``c.<record>...`` of a tensor array, ``c/<i>`` of a records array."""
    return os.path.basename(f).startswith("c.") or "/c/" in f


def stored_bytes(path: Path, sub: str = "") -> int:
    return sum(os.path.getsize(f) for f in files_of(path / sub) if _is_chunk(f) or not sub)


# --------------------------------------------------------------------------- dump making
def make_source(path: Path, steps: int, batch: int, compression: str, **settings: Any) -> None:
    import torch
    import torchvision
    from torch import nn

    from tdump.capture import Hook

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = Hook(
        str(path), include_regex=r".*relu", save_interval=1, compression=compression, **settings
    )
    hook.register_module(model)
    hook.register_loss(loss_fn)
    for _ in range(steps):
        x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    hook.close()


def replicate(src: Path, dst: Path, records: int) -> None:
    """Write ``records`` records to ``dst`` cycling ``src``'s real records (same codecs)."""
    from tdump._format import StoreReader, StoreWriter

    r = StoreReader(str(src))
    names = r.tensor_names("train")
    n_src = r.num_records("train")
    values = {(n, i): np.asarray(r.array("train", n)[i]) for n in names for i in range(n_src)}
    arrays = {n: r.array("train", n) for n in names}
    attrs = {n: r.tensor_attrs("train", n) for n in names}
    bs = r.records("train")["batch_size"]
    w = StoreWriter.create(str(dst))
    meta = r.meta()
    w.update_meta(modules=meta["modules"], calls=meta["calls"], config=meta.get("config"))
    for rec in range(records):
        for n in names:
            a = dict(attrs[n])
            dims = a.pop("dims")
            w.write_tensor(
                "train", rec, n, values[(n, rec % n_src)], dims=dims, attrs=a,
                compressors=arrays[n].compressors or None,
            )  # fmt: skip
        w.commit("train", rec, step=rec, batch_size=int(bs[rec % n_src]))


# --------------------------------------------------------------------------- measurements
class RSSSampler:
    """Peak RSS of this process and all its descendants (sum, and the largest one)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._t.start()

    def _run(self, interval: float) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self._proc, *self._proc.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_single = max(self.peak_single, rss)
            self.peak_total = max(self.peak_total, total)
            time.sleep(interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join()
        return {"peak_rss_total": self.peak_total, "peak_rss_single": self.peak_single}


def child_rank(dump: str, workers: int, memory_limit: str) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from tdump.analyze import rank

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
        dashboard_address=None, silence_logs=40,
    )  # fmt: skip
    client = Client(cluster)
    client.run(lambda: __import__("tdump.analyze"))  # imports are start-up, not throughput
    sampler = RSSSampler()
    t0 = time.perf_counter()
    df = rank(dump, scheduler=client, progress=False)
    secs = time.perf_counter() - t0
    out = {"seconds": secs, "filters": len(df), **sampler.stop()}
    client.close()
    cluster.close()
    return out


def child_naive(dump: str) -> dict[str, Any]:
    """The seed's way: a Python loop over steps, one tensor at a time, numpy accumulation."""
    from tdump._format import StoreReader

    sampler = RSSSampler()
    t0 = time.perf_counter()
    r = StoreReader(dump)
    names = [n for n in r.tensor_names("train") if re.search(r"relu\.output_\d+$", n)]
    acc: dict[str, np.ndarray] = {}
    for i in range(r.num_records("train")):
        for n in names:
            a = r.array("train", n)[i]
            g = r.array("train", n + ".grad")[i]
            v = np.abs((a.astype(np.float64) * g).mean(axis=(2, 3))).sum(axis=0)
            acc[n] = acc.get(n, 0) + v
    secs = time.perf_counter() - t0
    return {"seconds": secs, **sampler.stop()}


def raw_read(path: Path) -> float:
    drop_cache(path)
    files = files_of(path)
    t0 = time.perf_counter()
    for i in range(0, len(files), 500):
        subprocess.run(["cat", *files[i : i + 500]], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def codec_speed(path: Path, budget_bytes: int = 300 << 20) -> tuple[float, float, str]:
    """Single-core decode speed (stored GB/s, logical GB/s) of the dump's codecs on real records.

    The records' bytes are located as ``tdump rank`` locates them (a chunk file, or an
    entry of a shard's index) and read first: only the decoding is timed.
    """
    import numcodecs.blosc

    from tdump._chunks import chunk_files
    from tdump._format import StoreReader

    numcodecs.blosc.set_nthreads(1)
    r = StoreReader(str(path))
    blobs: list[tuple[Any, bytes]] = []
    labels: set[str] = set()
    total = 0
    for name in r.tensor_names("train"):
        files = chunk_files(r.array("train", name))
        if files is None:
            raise SystemExit(f"{path}: {name} is not a local tdump array")
        labels.add(repr(files.codec) if files.codec is not None else "none")
        for i in range(r.num_records("train")):
            fd = os.open(files.path(i), os.O_RDONLY)
            try:
                where = files._locate(fd, i, None)  # (offset, nbytes) of record i
                raw = os.pread(fd, where[1], where[0]) if where else b""
            finally:
                os.close(fd)
            blobs.append((files.codec, raw))
            total += len(raw)
            if total > budget_bytes:
                break
        if total > budget_bytes:
            break
    out = 0
    t0 = time.perf_counter()
    for codec, raw in blobs:
        out += len(codec.decode(raw)) if codec is not None else len(raw)
    secs = time.perf_counter() - t0
    return total / secs / 1e9, out / secs / 1e9, ", ".join(sorted(labels))


# --------------------------------------------------------------------------- driver
def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE), "_child", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="logical float32 GB of dump A")
    ap.add_argument("--large-factor", type=float, default=3.0, help="dump B = factor x dump A")
    ap.add_argument("--memory-limit", default="1GiB", help="per-worker memory limit")
    ap.add_argument(
        "--compression",
        default="auto",
        help="capture compression (auto = the default, lz4, zstd, ...)",
    )
    ap.add_argument("--dir", default="/tmp/tdump-rank-bench")
    ap.add_argument(
        "--no-variants", action="store_true", help="skip the storage-choice variants (dump A size)"
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    t0 = time.perf_counter()
    src = base / "source.zarr"
    make_source(src, steps=2, batch=32, compression=args.compression)
    from tdump._format import StoreReader

    rd = StoreReader(str(src))
    per_record = sum(
        int(np.prod(rd.array("train", n).shape[1:])) * 4 for n in rd.tensor_names("train")
    )
    sizes = {"A": args.size_gb, "B": args.size_gb * args.large_factor}
    dumps = {}
    for key, gb in sizes.items():
        recs = max(2, int(gb * 1e9 / per_record))
        dumps[key] = (base / f"dump_{key}.zarr", recs)
        replicate(src, dumps[key][0], recs)
    made = time.perf_counter() - t0
    big_stored = stored_bytes(dumps["B"][0])
    mem_limit = args.memory_limit
    method = drop_cache(base)
    print(
        f"# tdump rank throughput  (cpus={os.cpu_count()}, cache: {method}, made dumps in {made:.0f}s)"
    )
    print(f"# per saved step: {per_record / 1e6:.1f} MB float32 (17 ReLU outputs + gradients,"
          f" resnet18 batch 32 x 3x64x64); codec {args.compression}; worker memory limit {mem_limit},"
          f" dump B stored = {big_stored / 1e9:.2f} GB")  # fmt: skip
    dec_stored, dec_logical, label = codec_speed(dumps["A"][0])
    print(
        f"# codec ({label}) single-core decode: {dec_stored:.2f} GB/s stored, {dec_logical:.2f} GB/s logical"
    )
    rows = []
    for key, (path, recs) in dumps.items():
        logical = recs * per_record
        stored = stored_bytes(path)
        cat_s = raw_read(path)
        disk = stored / cat_s / 1e9
        res: dict[str, Any] = {}
        for w in (1, 2):
            drop_cache(path)
            res[w] = run_child("rank", str(path), str(w), mem_limit)
        naive = None
        if key == "A":
            drop_cache(path)
            naive = run_child("naive", str(path))
        rows.append((key, recs, logical, stored, cat_s, disk, res, naive))
    print()
    print("dump  steps  logical GB  stored GB  ratio | cat GB/s | workers  seconds  GB/s stored  GB/s logical"
          "  vs binding  vs naive  peak RSS all / largest (MB)")  # fmt: skip
    for key, recs, logical, stored, _cat_s, disk, res, naive in rows:
        for w in (1, 2):
            r = res[w]
            gbs = stored / r["seconds"] / 1e9
            bound = min(disk, w * dec_stored)
            speed = f"{naive['seconds'] / r['seconds']:.2f}x" if naive else "-"
            print(
                f"{key:>4}  {recs:>5}  {logical / 1e9:>10.2f}  {stored / 1e9:>9.2f}  {logical / stored:>5.2f}"
                f" | {disk:>8.2f} | {w:>7}  {r['seconds']:>7.1f}  {gbs:>11.2f}  {logical / r['seconds'] / 1e9:>12.2f}"
                f"  {gbs / bound:>9.2f}x  {speed:>8}  {r['peak_rss_total'] >> 20:>6} / {r['peak_rss_single'] >> 20}"
            )  # fmt: skip
        if naive:
            print(f"      naive loop (seed's way, 1 process): {naive['seconds']:.1f}s, "
                  f"{stored / naive['seconds'] / 1e9:.2f} GB/s stored, peak RSS {naive['peak_rss_total'] >> 20} MB")  # fmt: skip
    if not args.no_variants:
        print()
        print(
            "storage choices (dump A's steps, 2 workers): stored GB, seconds, logical-equivalent GB/s"
        )
        recs_a = dumps["A"][1]
        variants = {
            "float16 + lz4": {"storage_dtype": "float16"},
            "float32 + zstd": {"compression": "zstd"},
            "reduce-at-source taylor": {"reduction": "taylor"},
        }
        a_res = rows[0][6][2]
        print(f"  {'float32 + ' + args.compression:<26} {rows[0][3] / 1e9:7.2f} GB"
              f"  {a_res['seconds']:6.1f} s  {rows[0][2] / a_res['seconds'] / 1e9:6.2f} GB/s")  # fmt: skip
        for label, settings in variants.items():
            vsrc = base / f"src_{len(label)}.zarr"
            comp = settings.pop("compression", args.compression)
            make_source(vsrc, steps=2, batch=32, compression=comp, **settings)
            vpath = base / f"var_{len(label)}.zarr"
            replicate(vsrc, vpath, recs_a)
            shutil.rmtree(vsrc, ignore_errors=True)
            vstored = stored_bytes(vpath)
            drop_cache(vpath)
            vr = run_child("rank", str(vpath), "2", mem_limit)
            print(f"  {label:<26} {vstored / 1e9:7.2f} GB  {vr['seconds']:6.1f} s"
                  f"  {rows[0][2] / vr['seconds'] / 1e9:6.2f} GB/s")  # fmt: skip
            shutil.rmtree(vpath, ignore_errors=True)
    a2, b2 = rows[0][6][2], rows[1][6][2]
    a1 = rows[0][6][1]
    print()
    print(f"speed-up 2 vs 1 worker (dump A): {a1['seconds'] / a2['seconds']:.2f}x (target >= 1.8x)")
    print(f"peak RSS growth A -> B ({rows[1][2] / rows[0][2]:.1f}x data): "
          f"{b2['peak_rss_total'] / a2['peak_rss_total']:.2f}x total (target: flat)")  # fmt: skip
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, dump = sys.argv[2], sys.argv[3]
        result = (
            child_rank(dump, int(sys.argv[4]), sys.argv[5]) if kind == "rank" else child_naive(dump)
        )
        print(json.dumps(result))
    else:
        main()
