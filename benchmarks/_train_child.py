"""One training run of the capture benchmarks, in its own process; prints one JSON line.

Run by ``benchmarks/capture_overhead.py`` and ``benchmarks/peer_smdebug.py``, never by
hand. It imports only torch, torchvision and the hook under test, so the smdebug run can
use another virtualenv (``--hook smdebug``): smdebug 1.0.34 needs numpy < 2.

The timed span starts before the hook is created and ends after ``close()`` returned
(everything queued is written) and, on CUDA, after the device finished: the total time
a training job pays. Two un-timed plain warm-up steps come first (allocations, kernels).

With ``--hook tdump`` the child also measures where a saved step's time goes, by
wrapping (in this process only) the functions that do the work:

* training thread: the copies out of torch (``snapshot``), waiting for a full queue
  (``BackgroundWriter.submit``), and the rest of the hooks' Python;
* writer thread: conversion to numpy, encoding (the codec), file-system calls (open,
  write, rename, folders), creating arrays (first record), committing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from _common import SEED_INCLUDE  # stdlib only: this file may run without tdump (peer venv)
from torch import nn


class _Timers:
    """Seconds spent per label, summed (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.seconds[label] += dt

        return timed


class _TimedCodec:
    """A numcodecs codec whose ``encode`` is timed."""

    def __init__(self, codec: Any, timers: _Timers) -> None:
        self._codec = codec
        self.encode = timers.wrap("writer: encode", codec.encode)
        self.decode = codec.decode


def _instrument_tdump(timers: _Timers) -> None:
    """Time the hook's and the writer's parts (see the module docstring)."""
    import tdump._format as fmt
    import tdump.capture._step as step_mod
    import tdump.capture._writer as writer_mod
    from tdump._chunks import ChunkFiles

    step_mod.snapshot = timers.wrap("train: copy out of torch", step_mod.snapshot)  # type: ignore[attr-defined]
    writer_mod._to_numpy = timers.wrap("writer: to numpy / cast", writer_mod._to_numpy)
    bw = writer_mod.BackgroundWriter
    bw.submit = timers.wrap("train: wait for the writer queue", bw.submit)  # type: ignore[method-assign]
    ChunkFiles.write = timers.wrap("writer: chunk write (encode + fs)", ChunkFiles.write)  # type: ignore[method-assign]
    try:  # store format 2: records appended to shard files
        from tdump._shards import ShardFiles

        ShardFiles.write = timers.wrap("writer: chunk write (encode + fs)", ShardFiles.write)  # type: ignore[method-assign]
    except ImportError:
        pass
    sw = fmt.StoreWriter
    sw.commit = timers.wrap("writer: commit (records arrays)", sw.commit)  # type: ignore[method-assign]
    sw._create_tensor = timers.wrap("writer: create arrays", sw._create_tensor)  # type: ignore[method-assign]
    original = fmt.chunk_files

    def chunk_files(arr: Any) -> Any:
        files = original(arr)
        if files is not None and files.codec is not None:
            files.codec = _TimedCodec(files.codec, timers)
        return files

    fmt.chunk_files = chunk_files  # type: ignore[assignment]


def _smdebug_hook(out: str, interval: int, include: str) -> Any:
    """smdebug's PyTorch hook plus ReLU-output gradients, as the seed's custom hook had."""
    import smdebug.pytorch as smd

    class SeedHook(smd.Hook):  # type: ignore[misc]
        def forward_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            super().forward_hook(module, inputs, outputs)
            name = getattr(module, "_module_name", "")
            if (
                isinstance(outputs, torch.Tensor)
                and outputs.requires_grad
                and re.search(r"relu", name)
                and self._get_collections_to_save_for_step()
            ):
                k = self.written_tensor_name_for_step.get(name + self.OUTPUT_TENSOR_SUFFIX, 1) - 1
                tname = f"gradient/{name}_output_{k}"
                outputs.register_hook(lambda g, n=tname: self._save_for_tensor(n, g))

    return SeedHook(
        out_dir=out,
        save_config=smd.SaveConfig(save_interval=interval),
        include_regex=[include],
        # the seed's selection names weights, biases and their gradients too
        include_collections=["weights", "biases", "gradients", "losses"]
        if include == SEED_INCLUDE
        else [],
        save_all=False,
    )


def _dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            if not f.endswith(".partial"):
                total += os.path.getsize(os.path.join(d, f))
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hook", choices=["none", "tdump", "smdebug"], required=True)
    p.add_argument("--interval", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="{}", help="JSON: extra tdump Hook settings")
    p.add_argument("--split", action="store_true", help="tdump: time the parts of a saved step")
    p.add_argument("--include", default=SEED_INCLUDE, help="selection regex (both hooks)")
    p.add_argument("--keep", action="store_true", help="keep the dump (default: deleted)")
    p.add_argument(
        "--store-format", type=int, default=0, help="tdump: write this store format (1: old layout)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(dev)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    sync()
    shutil.rmtree(args.out, ignore_errors=True)
    timers = _Timers()
    if args.hook == "tdump" and args.split:
        _instrument_tdump(timers)
    step_times: list[float] = []
    c0 = time.process_time()  # CPU seconds of all threads: robust to other load on the machine
    t0 = time.perf_counter()
    hook: Any = None
    if args.hook == "tdump":
        import tdump._format
        from tdump.capture import Hook

        if args.store_format:  # a new store is written in tdump._format.FORMAT_VERSION
            tdump._format.FORMAT_VERSION = args.store_format
        settings = {"include_regex": args.include, **json.loads(args.settings)}
        hook = Hook(args.out, save_interval=args.interval, **settings)
        hook.register_module(model)
        hook.register_loss(crit)
    elif args.hook == "smdebug":
        hook = _smdebug_hook(args.out, args.interval, args.include)
        hook.register_module(model)
        hook.register_loss(crit)
    for _ in range(args.steps):
        s0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - s0)
    t_loop = time.perf_counter()
    if args.hook == "tdump":
        hook.close()
    elif args.hook == "smdebug":
        hook._cleanup()  # what smdebug runs at exit: closes (flushes) its event writers
    sync()
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    saved = [i for i in range(args.steps) if i % args.interval == 0]
    result: dict[str, Any] = {
        "hook": args.hook,
        "interval": args.interval,
        "steps": args.steps,
        "saved_steps": len(saved) if args.hook != "none" else 0,
        "total_s": total,
        "cpu_s": cpu,
        "close_s": time.perf_counter() - t_loop,
        "step_s": step_times,
        "stored_bytes": _dir_bytes(args.out) if args.hook != "none" else 0,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }
    if args.hook == "tdump":
        result["writer"] = dict(hook.writer.stats) if hook.writer is not None else {}
        result["split"] = dict(timers.seconds)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
