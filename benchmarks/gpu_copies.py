"""Copying a saved step out of a CUDA model: what each way costs the training thread.

Run on a machine with a CUDA GPU: ``python benchmarks/gpu_copies.py``. It takes the
tensors the seed's selection saves from a CUDA resnet18 (weights, biases, their
gradients, BatchNorm running stats, ReLU outputs and their gradients; one training
step, batch 32x3x64x64) and copies them to the host in several ways, timing two
things per saved step: the training thread's time to queue the copies (what a
hook costs the step directly) and the time until the last copy has landed.

* ``pinned, fresh``: a new pinned tensor per copy (PyTorch's caching host
  allocator), non-blocking copy, a CUDA event per tensor.
* ``pinned, reused``: the hook's ``HostBuffers`` (``tdump/capture/_writer.py``): pinned
  buffers handed back after the record is written, reused by the next saved step.
* ``... one event``: one event for the step instead of one per tensor (what the
  hook does: one per CUDA stream it copied on).
* ``pageable, blocking``: ``t.cpu()``, what a plain hook does.
* ``one copy of all bytes``: a single pinned copy of the same number of bytes, the
  transfer's floor.

The copies run with nothing else in the process. Inside a real run the writer's
threads compete for the GIL, which every PyTorch call releases and must take back:
``capture_overhead.py --device cuda`` shows that share as the rest of "copies out of
torch" (``benchmarks/results/capture_overhead_h200.txt``, run 3). A first version of
this script also timed the copies beside 4 threads spinning in pure Python (the
worst case): it did not finish 22 repetitions in 8 minutes, since a thread that never
blocks keeps the GIL for up to CPython's 5 ms switch interval each time it takes it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from tdump.capture._writer import HostBuffers

SEED = re.compile(r".*relu|.*weight|.*bias|.*running_mean|.*running_var")


def seed_tensors(dev: torch.device, batch: int, size: int) -> list[torch.Tensor]:
    """The tensors one saved step of the seed's selection copies, held on ``dev``."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(dev)
    for m in model.modules():  # keep each ReLU's output: in-place ReLUs would overwrite it
        if isinstance(m, nn.ReLU):
            m.inplace = False
    acts: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def keep(_: nn.Module, __: Any, out: torch.Tensor) -> None:
        acts.append(out.detach())
        out.register_hook(lambda g: grads.append(g.detach()))

    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU) and SEED.fullmatch(name):
            m.register_forward_hook(keep)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    nn.functional.cross_entropy(model(x), y).backward()
    params = [p.detach() for n, p in model.named_parameters() if SEED.fullmatch(n)]
    pgrads = [p.grad.detach() for n, p in model.named_parameters() if p.grad is not None]
    bufs = [b for n, b in model.named_buffers() if SEED.fullmatch(n)]
    torch.cuda.synchronize(dev)
    return [*params, *pgrads, *bufs, *acts, *grads]


def fresh_pinned(t: torch.Tensor) -> torch.Tensor:
    """A new pinned tensor (PyTorch's caching host allocator) filled non-blocking."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def queue_copies(
    copy: Callable[[torch.Tensor], torch.Tensor], ts: list[torch.Tensor], event_each: bool
) -> tuple[list[torch.Tensor], list[Any]]:
    """``copy`` of every tensor, with a CUDA event recorded after each when ``event_each``."""
    hosts, events = [], []
    for t in ts:
        hosts.append(copy(t))
        if event_each:
            e = torch.cuda.Event()
            e.record()
            events.append(e)
    return hosts, events


def time_way(
    queue: Callable[[], tuple[list[torch.Tensor], list[Any]]],
    after: Callable[[list[torch.Tensor]], None],
    reps: int,
) -> tuple[float, float]:
    """Median seconds to queue the copies, and until they have landed."""
    q_s, all_s = [], []
    for r in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hosts, events = queue()
        t1 = time.perf_counter()
        last = torch.cuda.Event()
        last.record()
        for e in events:
            e.synchronize()
        last.synchronize()
        t2 = time.perf_counter()
        after(hosts)
        if r >= 2:  # two warm-ups: allocations, the pool's first fill
            q_s.append(t1 - t0)
            all_s.append(t2 - t0)
    return statistics.median(q_s), statistics.median(all_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    dev = torch.device("cuda")
    ts = seed_tensors(dev, args.batch, args.size)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    pool = HostBuffers()
    pool.limit = 2 * nbytes

    def give_all(hosts: list[torch.Tensor]) -> None:
        for h in hosts:
            pool.give(h)

    big = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    big_host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
    ways: dict[str, tuple[Callable[[], Any], Callable[[list[torch.Tensor]], None]]] = {
        "pinned, fresh (event per tensor)": (
            lambda: queue_copies(fresh_pinned, ts, True),
            lambda hs: None,
        ),
        "pinned, fresh, one event": (
            lambda: queue_copies(fresh_pinned, ts, False),
            lambda hs: None,
        ),
        "pinned, reused (event per tensor)": (
            lambda: queue_copies(pool.copy_of, ts, True),
            give_all,
        ),
        "pinned, reused, one event": (lambda: queue_copies(pool.copy_of, ts, False), give_all),
        "pageable, blocking (t.cpu())": (lambda: ([t.cpu() for t in ts], []), lambda hs: None),
        "one copy of all bytes": (
            lambda: ([big_host.copy_(big, non_blocking=True)], []),
            lambda hs: None,
        ),
    }
    print(
        f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; one saved step of the "
        f"seed's selection, resnet18 batch {args.batch}x3x{args.size}x{args.size}: {len(ts)} "
        f"tensors, {nbytes / 1e6:.1f} MB; median of {args.reps} reps"
    )
    head = f"{'way':<36} | {'queued ms':>9} | {'landed ms':>9}"
    print(head)
    print("-" * len(head))
    landed = 0.0
    for label, (queue, after) in ways.items():
        queued, landed = time_way(queue, after, args.reps)
        print(f"{label:<36} | {queued * 1e3:9.2f} | {landed * 1e3:9.2f}")
    print(f"one copy of all bytes moves {nbytes / 1e9 / landed:.1f} GB/s (the transfer's floor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
