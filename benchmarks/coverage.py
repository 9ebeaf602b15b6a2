"""Which torchvision classifiers the surgery prunes exactly, and how fast.

For every model of ``torchvision.models.list_models(module=torchvision.models)``:
random weights, L1 ranks from the weights, ``ratio=0.3`` global and per-layer, and the
checks of ``tests/surgery/zoo.py`` (output shape, float64 equivalence against the
removed channels taken out by hooks, save -> ``torch.load(weights_only=True)`` ->
``surgery.load``, a training-mode forward and backward). Prints one row per model and
scope (status, parameters before -> after, conv filters removed, prune time) and the
count of models that pass every check in both scopes.

Models over 50 M parameters (``tests/surgery/test_zoo.py``'s ``HEAVY``) run in float32
(equivalence to 1e-4; the others in float64, to 1e-9) and after the others.

Run: ``.venv/bin/python benchmarks/coverage.py [NAME ...] [--no-save-load]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.surgery.zoo

from tests.surgery.test_zoo import HEAVY
from tests.surgery.zoo import check, names


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--no-save-load", action="store_true", help="skip the checkpoint check")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    todo = args.models or sorted(names(), key=lambda n: n in HEAVY)
    passed, t_all = 0, time.perf_counter()
    print(f"torch {torch.__version__}, ratio 0.3, {len(todo)} models, {args.threads} threads")
    print(
        f"{'model':<20} {'scope':<9} {'params before -> after':>22} {'filters gone':>13} {'prune':>7}  {'dtype':<7} status"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in todo:
            t0 = time.perf_counter()
            dtype = torch.float32 if name in HEAVY else torch.float64
            results = check(name, Path(tmp), save_load=not args.no_save_load, dtype=dtype)
            for r in results:
                print(
                    f"{name:<20} {r.scope:<9} {_m(r.params_before) + ' -> ' + _m(r.params_after):>22} "
                    f"{r.filters_removed:>6}/{r.filters_before:<6} {r.prune_s:>6.2f}s  "
                    f"{str(dtype)[6:]:<7} {r.status}",
                    flush=True,
                )
            passed += all(r.status == "ok" for r in results)
            print(f"{'':<20} ({time.perf_counter() - t0:.1f} s all checks)", flush=True)
    print(
        f"passed every check in both scopes: {passed} of {len(todo)} ({time.perf_counter() - t_all:.0f} s)"
    )


if __name__ == "__main__":
    main()
