"""Ranking throughput on a Dask cluster started with `dask scheduler` / `dask worker`.

Makes a resnet18 dump (ReLU outputs and their gradients, every step, lz4; the records
of ``benchmarks/rank_throughput.py``, replicated to ``--size-gb`` logical GB), copies it
into a bucket on moto's S3 server (127.0.0.1), then starts a `dask scheduler` and 1, then
2 `dask worker --nthreads 1 --memory-limit 1GiB` processes on loopback and times
``tdump.rank(dump, scheduler="tcp://...")`` for the local dump (page cache dropped
first where permitted) and for the ``s3://`` copy. Dask's threaded scheduler in one
process is the baseline. Each figure is the best of ``--repeat`` runs; the load average
is printed because other work on the machine slows every figure.

Run: ``python benchmarks/scale_throughput.py --size-gb 0.5`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rank_throughput import drop_cache, make_source, replicate, stored_bytes  # noqa: E402

BIN = Path(sys.executable).parent
STEP_MB = 48.2  # logical float32 MB per saved step of make_source's run (batch 32, 64x64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def best(fn: Callable[[], object], repeat: int, before: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.5, help="logical float32 GB of the dump")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/tdump-scale-bench")
    args = ap.parse_args()

    import s3fs
    from distributed import Client

    import tdump

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, dump = work / "src.zarr", work / "dump.zarr"
    records = max(2, round(args.size_gb * 1000 / STEP_MB))
    make_source(src, steps=4, batch=32, compression="lz4")
    replicate(src, dump, records)
    stored = stored_bytes(dump, "rank0/train/tensors") / 1e9
    logical = records * STEP_MB / 1000

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(aws)
    procs = [start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])]
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put(str(dump), "bench/dump.zarr", recursive=True)
        upload = time.perf_counter() - t0
        url = "s3://bench/dump.zarr"

        print(
            f"# tdump rank on `dask scheduler` + `dask worker` processes (cpus={os.cpu_count()}, "
            f"load average at start {os.getloadavg()[0]:.1f})"
        )
        print(
            f"# dump: {records} records of resnet18 ReLU outputs + gradients, lz4: "
            f"{logical:.2f} GB logical, {stored:.2f} GB stored; copied to moto S3 in {upload:.1f} s"
        )
        print(f"# best of {args.repeat} runs; local dump: page cache dropped before each run\n")
        print(
            f"{'where':<10} {'scheduler':<28} {'seconds':>8} {'GB/s stored':>12} {'GB/s logical':>13}"
        )

        def row(where: str, sched: str, secs: float) -> None:
            print(
                f"{where:<10} {sched:<28} {secs:8.2f} {stored / secs:12.3f} {logical / secs:13.3f}",
                flush=True,
            )

        def cold() -> None:
            drop_cache(dump)

        secs = best(lambda: tdump.rank(str(dump), progress=False), args.repeat, cold)
        row("local", "threads (2, one process)", secs)

        sport = free_port()
        address = f"tcp://127.0.0.1:{sport}"
        procs.append(
            start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(sport),
                   "--no-dashboard"])
        )  # fmt: skip
        for n in (1, 2):
            procs.append(
                start([str(BIN / "dask"), "worker", address, "--host", "127.0.0.1",
                       "--nthreads", "1", "--memory-limit", "1GiB", "--no-dashboard"])
            )  # fmt: skip
            with Client(address, timeout="60s") as client:
                client.wait_for_workers(n, timeout=120)
                client.run(lambda: __import__("tdump.analyze"))  # start-up, not throughput
            for where, path, before in (
                ("local", str(dump), cold),
                ("s3 (moto)", url, lambda: None),
            ):
                secs = best(
                    lambda p=path: tdump.rank(p, scheduler=address, progress=False),  # type: ignore[misc]
                    args.repeat,
                    before,
                )
                row(where, f"tcp, {n} worker{'s' * (n > 1)} x 1 thread", secs)
        print(f"\n# load average at end {os.getloadavg()[0]:.1f}")
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
