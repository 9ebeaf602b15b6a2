"""How fast is surgery, and is the pruned model actually faster?

1. trace + plan + rewrite time of ``tdump.surgery.prune`` for torchvision resnet18 and
   resnet50 (random weights, random ranks; tracing included; median of ``--repeat``),
   with the breakdown trace+graph / select / rewrite.
2. a 50%-pruned resnet18 (global, ``--ratio 0.5``): CPU inference latency
   pruned/original beside the parameter and FLOP ratios.

Run: ``.venv/bin/python benchmarks/prune_speed.py [--threads 2] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from torch import nn

import tdump.surgery as surgery
from tdump.surgery._apply import apply_keeps
from tdump.surgery._plan import Settings, keeps_for, select


def _scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    }


def _times(
    fn: Callable[[], object], repeat: int, setup: Callable[[], None] | None = None
) -> list[float]:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()  # not timed
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _median(fn: Callable[[], object], repeat: int) -> float:
    return statistics.median(_times(fn, repeat))


def surgery_speed(name: str, repeat: int) -> None:
    model = getattr(torchvision.models, name)().eval()
    scores = _scores(model)

    box: list[nn.Module] = []

    def setup() -> None:
        box[:] = [copy.deepcopy(model)]

    def full() -> None:
        surgery.prune(box[0], scores, ratio=0.3, inplace=True)

    def graph_only() -> None:
        surgery.build_graph(model)

    first = _times(full, 1, setup)[0]  # one-time costs (fx, lazy imports) on the first model
    totals = _times(full, repeat, setup)
    total = statistics.median(totals)
    with_copy = _median(lambda: surgery.prune(model, scores, ratio=0.3), repeat)
    trace = _median(graph_only, repeat)
    graph = surgery.build_graph(model)
    settings = Settings(ratio=0.3)
    sel = _median(lambda: select(graph, scores, settings), repeat)
    plan = select(graph, scores, settings)
    rewrite = statistics.median(
        _times(lambda: apply_keeps(box[0], graph, keeps_for(graph, plan)), repeat, setup)
    )
    print(
        f"{name:<9} prune(ratio=0.3) median {total * 1e3:6.1f} ms, max {max(totals) * 1e3:6.1f} ms, first call {first * 1e3:6.1f} ms  "
        f"(trace+graph {trace * 1e3:6.1f} ms, select {sel * 1e3:5.1f} ms, rewrite {rewrite * 1e3:6.1f} ms; "
        f"model copy excluded)\n{'':<9} prune() default (deep copy of the model included): median {with_copy * 1e3:6.1f} ms"
    )


@torch.no_grad()
def latencies(
    a: nn.Module, b: nn.Module, x: torch.Tensor, repeat: int
) -> tuple[float, float, float]:
    """Median latency of ``a`` and ``b``, and the median of per-pair ratios b/a.

    Runs alternate (a, b, a, b, ...) so both see the same load on a shared machine.
    """
    a.eval(), b.eval()
    for _ in range(2):
        a(x), b(x)
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(_times(lambda: a(x), 1)[0])
        tb.append(_times(lambda: b(x), 1)[0])
    ratios = [q / p for p, q in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def speedup(repeat: int) -> None:
    model = torchvision.models.resnet18().eval()
    pruned, plan = surgery.prune(model, _scores(model), ratio=0.5, round_to=8)
    pos = surgery.output_positions(model, (3, 224, 224))
    f0 = sum(surgery.layer_flops(model, pos).values())
    f1 = sum(surgery.layer_flops(pruned, pos).values())
    p0, p1 = surgery.count_params(model), surgery.count_params(pruned)
    print(f"\nresnet18, 50% of conv channels removed (global, round_to=8): {plan.removed} channels")
    print(f"  params {p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M   ratio {p1 / p0:.3f}")
    print(f"  FLOPs  {f0 / 1e9:.2f}G -> {f1 / 1e9:.2f}G   ratio {f1 / f0:.3f}")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        t0, t1, ratio = latencies(model, pruned, x, repeat)
        print(
            f"  latency batch {batch}: {t0 * 1e3:7.1f} ms -> {t1 * 1e3:7.1f} ms   ratio {ratio:.3f} (median of paired runs)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name in ("resnet18", "resnet50"):
        surgery_speed(name, args.repeat)
    speedup(args.repeat)


if __name__ == "__main__":
    main()
