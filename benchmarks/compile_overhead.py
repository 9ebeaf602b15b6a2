"""What does capture cost a ``torch.compile``d model, and does it record the same tensors?

Four configurations, each its own process with a fresh inductor cache (no FX graph or
AOT autograd cache): eager and compiled resnet18, each without and with a
``tdump.Hook`` (the seed's selection). Each trains ``--steps`` steps on one fixed
batch (8x3x64x64), saving every ``--interval``-th. Printed per configuration: the
first 5 steps' seconds (compilation included), the median step of the last 20 (a
saved step among them counts as one of 20), and the whole run including the hook's
``close()``. Then the hooked compiled dump against the hooked eager dump at step 0
(max difference over the largest value, per tensor; same weights and batch), beside
what compiling alone changes: the un-hooked compiled run's step-0 weight gradients
against the un-hooked eager run's (inductor reorders float sums, and some gradients
move by far more than float32 rounding, with or without tdump).

Run: ``.venv/bin/python benchmarks/compile_overhead.py [--steps 45] [--interval 20]``
(about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SEED_INCLUDE, run

CONFIGS = ("eager", "eager+hook", "compiled", "compiled+hook")


def child(config: str, steps: int, interval: int, out: str) -> None:
    """Train under ``config``; print one JSON line of timings."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    hook = None
    if config.endswith("+hook"):
        import tdump

        hook = tdump.Hook(
            out, include_regex=SEED_INCLUDE, save_interval=interval, write_mode="overwrite"
        )
        hook.register_module(model)
        hook.register_loss(loss_fn)
    forward = torch.compile(model) if config.startswith("compiled") else model
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    times = []
    for step in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(forward(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
        if step == 0 and hook is None:  # step 0's gradients (SGD's step leaves them), untimed
            grads = {f"{n}.grad": q.grad.numpy().copy() for n, q in model.named_parameters()}
    if hook is None:
        import numpy as np

        np.savez(out + ".npz", **grads)
    else:
        hook.close()
    result = {
        "first5_s": sum(times[:5]),
        "median_ms": 1000 * statistics.median(times[-20:]),
        "total_s": time.perf_counter() - t0,
    }
    print(json.dumps(result))


def compare(dump: str, eager_dump: str) -> dict[str, float]:
    """Per tensor at record 0: ``max |dump - eager| / max |eager|``."""
    import numpy as np

    from tdump._format import StoreReader

    a, b = StoreReader(dump), StoreReader(eager_dump)
    names = sorted(set(a.tensor_names("train", 0)) & set(b.tensor_names("train", 0)))
    out = {}
    for name in names:
        x = np.asarray(a.array("train", name)[0], dtype=np.float64)
        y = np.asarray(b.array("train", name)[0], dtype=np.float64)
        out[name] = float(np.abs(x - y).max()) / (float(np.abs(y).max()) or 1.0)
    return out


def compile_own(grads_npz: str, eager_npz: str) -> dict[str, float]:
    """The same measure between the un-hooked compiled and eager runs' step-0 gradients."""
    import numpy as np

    a, b = np.load(grads_npz), np.load(eager_npz)
    return {
        n: float(np.abs(a[n].astype(np.float64) - b[n]).max()) / (float(np.abs(b[n]).max()) or 1.0)
        for n in a.files
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--interval", type=int, default=20)
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.interval, args.out)
        return
    print(f"resnet18, batch 8x3x64x64, {args.steps} steps, save_interval={args.interval}")
    print(f"{'configuration':<15} {'first 5 steps s':>16} {'median step ms':>15} {'total s':>8}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in CONFIGS:
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, f"inductor-{config}"),
                "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
            }
            out = os.path.join(tmp, f"{config}.zarr")
            cmd = [sys.executable, __file__, "--child", config, "--out", out]
            cmd += ["--steps", str(args.steps), "--interval", str(args.interval)]
            proc, _ = run(cmd, env)
            r = results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{config:<15} {r['first5_s']:>16.1f} {r['median_ms']:>15.0f} {r['total_s']:>8.1f}",
                flush=True,
            )
        dev = compare(os.path.join(tmp, "compiled+hook.zarr"), os.path.join(tmp, "eager+hook.zarr"))
        own = compile_own(
            os.path.join(tmp, "compiled.zarr.npz"), os.path.join(tmp, "eager.zarr.npz")
        )
    for base in ("eager", "compiled"):
        r, h = results[base], results[base + "+hook"]
        print(
            f"{base}: hooked / un-hooked  first 5 steps {h['first5_s'] / r['first5_s']:.2f}x, "
            f"median step {h['median_ms'] / r['median_ms']:.2f}x, "
            f"total {h['total_s'] / r['total_s']:.2f}x"
        )
    print(
        f"record 0 of the compiled dump against the eager dump, {len(dev)} tensors, "
        "max|diff| / max|eager|; beside it compile's own, the un-hooked compiled run's "
        "step-0 gradients against the un-hooked eager run's:"
    )
    for name in sorted(dev, key=dev.__getitem__, reverse=True)[:5]:
        theirs = f"{own[name]:.2e}" if name in own else "-"
        print(f"  {name:<32} dump {dev[name]:.2e}   compile's own {theirs}")
    grads = [n for n in dev if n in own]
    print(
        f"  weight gradients: dump worst {max(dev[n] for n in grads):.2e}, compile's own "
        f"worst {max(own[n] for n in grads):.2e}; every other tensor (weights, outputs, their "
        f"gradients): "
        f"{max(v for n, v in dev.items() if n not in own):.2e}"
    )


if __name__ == "__main__":
    main()
