"""Capture overhead: resnet18 on the CPU, hooked vs un-hooked, interleaved in one run.

Setup (issue 2): torchvision resnet18, batch 32x3x64x64, SGD steps, the seed's
selection (ReLU outputs and their gradients, weights, biases, parameter gradients,
BatchNorm running stats) at save_interval 100, 10 and 1. Two identical models train
side by side on the same batches, one with a :class:`tdump.capture.Hook` and one
without, alternating which goes first, so machine noise hits both alike.

Reported per interval: the ratio of **mean** step time (what total training time
feels; includes back-pressure from the writer), the ratio of median step time, a
saved step vs an un-saved hooked step and vs the un-hooked median, write throughput
of the background writer, and bytes per saved step raw vs stored. Targets: mean
ratio <= 1.01 at 100, <= 1.05 at 10, <= 1.5 at 1; a saved step <= 1.3x an unsaved one.

    python benchmarks/capture_overhead.py            # the reference run (~3-5 min on 2 cores)
    python benchmarks/capture_overhead.py --quick    # smoke run: 32x3x32x32, fewer steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from tdump.capture import DEFAULT_INCLUDE, Hook


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, crit: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    crit(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t0


def _dir_bytes(path: Path) -> int:
    """Bytes of chunk files (``c.<record>...`` of tensors, ``c/<i>`` of the records arrays)."""
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and (f.name.startswith("c.") or "/c/" in f.as_posix())
    )


def run_interval(
    interval: int,
    steps: int,
    size: int,
    batch: int,
    workdir: Path,
    compression: str,
    storage_dtype: str | None = None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    hooked = torchvision.models.resnet18(num_classes=10)
    hooked.load_state_dict(plain.state_dict())
    crit = nn.CrossEntropyLoss()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_h = torch.optim.SGD(hooked.parameters(), lr=0.01, momentum=0.9)
    out = workdir / f"interval{interval}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    # step 0 is a warm-up save (creates the arrays, traces the calls); then the measured
    # steps 2..steps+1 save every `interval`-th step, the first one mid-period
    saves = [0, *range(2 + interval // 2, steps + 2, interval)]
    hook = Hook(
        str(out),
        include_regex=DEFAULT_INCLUDE,
        save_interval=interval,
        save_steps=saves,
        compression=compression,
        storage_dtype=storage_dtype,
    )
    hook.register_module(hooked)
    hook.register_loss(crit)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    # warm-up both (first steps allocate); the hook's step counter starts after it
    for _ in range(2):
        _step(plain, opt_p, crit, x, y)
    _step(hooked, opt_h, crit, x, y)  # step 0: the warm-up save
    _step(hooked, opt_h, crit, x, y)  # step 1 (hands step 0 to the writer)
    hook.flush()
    writer0 = dict(hook.writer.stats)
    t_plain: list[float] = []
    t_hook: list[float] = []
    for i in range(steps):
        if i % 2 == 0:
            t_plain.append(_step(plain, opt_p, crit, x, y))
            t_hook.append(_step(hooked, opt_h, crit, x, y))
        else:
            t_hook.append(_step(hooked, opt_h, crit, x, y))
            t_plain.append(_step(plain, opt_p, crit, x, y))
    t0 = time.perf_counter()
    hook.close()
    flush = time.perf_counter() - t0
    saved_idx = [i for i in range(steps) if i + 2 in saves]
    unsaved = [t for i, t in enumerate(t_hook) if i not in saved_idx]
    saved = [t_hook[i] for i in saved_idx]
    stats = {k: v - writer0[k] for k, v in hook.writer.stats.items()}
    records = max(int(stats["records"]), 1)
    stored = _dir_bytes(out) * records / (records + 1)
    return {
        "interval": interval,
        "steps": steps,
        "saved_steps": len(saved),
        "mean_plain_s": statistics.fmean(t_plain),
        "mean_hooked_s": statistics.fmean(t_hook),
        "mean_ratio": statistics.fmean(t_hook) / statistics.fmean(t_plain),
        "median_ratio": statistics.median(t_hook) / statistics.median(t_plain),
        "saved_step_s": statistics.median(saved),
        "unsaved_step_s": statistics.median(unsaved) if unsaved else float("nan"),
        "saved_vs_unsaved": statistics.median(saved) / statistics.median(unsaved)
        if unsaved
        else float("nan"),
        "saved_vs_plain": statistics.median(saved) / statistics.median(t_plain),
        "flush_at_close_s": flush,
        "write_MBps": stats["bytes_raw"] / 1e6 / max(stats["write_seconds"], 1e-9),
        "raw_MB_per_saved_step": stats["bytes_raw"] / 1e6 / records,
        "stored_MB_per_saved_step": stored / 1e6 / records,
        "compression_ratio": stats["bytes_raw"] / max(stored, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32x32 images, fewer steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compression", default="zstd")
    p.add_argument("--storage-dtype", default=None, choices=["float16", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.add_argument("--workdir", default=None, help="where the dumps go (default: a temp dir)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = 32 if args.quick else 64
    plan = [(100, 100), (10, 20 if args.quick else 30), (1, 4 if args.quick else 10)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tdump-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"resnet18, CPU, {torch.get_num_threads()} threads, batch 32x3x{size}x{size}, "
        f"seed selection, compression {args.compression}, storage {args.storage_dtype or 'float32'}"
    )
    rows = []
    for interval, steps in plan:
        r = run_interval(interval, steps, size, 32, workdir, args.compression, args.storage_dtype)
        rows.append(r)
        print(
            f"interval {interval:>3}: mean ratio {r['mean_ratio']:.3f}  median ratio {r['median_ratio']:.3f}  "
            f"saved step {r['saved_step_s'] * 1e3:.0f} ms vs unsaved {r['unsaved_step_s'] * 1e3:.0f} ms "
            f"({r['saved_vs_unsaved']:.2f}x; {r['saved_vs_plain']:.2f}x un-hooked)  "
            f"write {r['write_MBps']:.0f} MB/s  per saved step {r['raw_MB_per_saved_step']:.1f} MB raw -> "
            f"{r['stored_MB_per_saved_step']:.1f} MB stored ({r['compression_ratio']:.2f}x)  "
            f"[{r['steps']} steps, plain mean {r['mean_plain_s'] * 1e3:.0f} ms]",
            flush=True,
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
