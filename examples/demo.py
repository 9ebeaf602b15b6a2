"""`make demo`: the pruning loop, several rounds, on bundled data, then its table and figure.

Runs ``tdump loop examples/loop_train.py`` (ResNet18 on Fashion-MNIST at 32x32, or
scikit-learn's digits where Fashion-MNIST is not installed): round 0 trains under
capture; every later round ranks the previous round's dump, prunes a quarter of the
channels and fine-tunes. Each stage is its own process, printed as it starts.
Then ``tdump experiments show`` and ``tdump experiments plot`` (``out/demo/curve.png``).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tdump(*args: str) -> None:
    shown = shlex.join(["tdump", *args])
    print(f"\n$ {shown}", flush=True)
    code = subprocess.call([sys.executable, "-m", "tdump", *args], cwd=ROOT)
    if code:
        sys.exit(f"demo: {shown} failed (exit {code})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo")
    p.add_argument("--data", default="auto")
    p.add_argument("--rounds", type=int, default=4, help="rounds, round 0 included")
    p.add_argument(
        "--ratio", type=float, default=0.25, help="fraction of channels pruned per round"
    )
    p.add_argument("--steps", type=int, default=300, help="round 0's training steps")
    p.add_argument("--finetune-steps", type=int, default=120, help="each later round's steps")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    args = p.parse_args()

    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    exp = f"{args.out}/experiment"
    train_args = ["--data", args.data, "--steps", str(args.steps)]
    train_args += ["--finetune-steps", str(args.finetune_steps)]
    if args.train_limit:
        train_args += ["--train-limit", str(args.train_limit)]
    tdump(
        "loop", "examples/loop_train.py", "--rounds", str(args.rounds), "--ratio", str(args.ratio),
        "--arch", "torchvision.models.resnet18", "--arch-kwargs", '{"num_classes": 10}',
        "--interval", "25", "--input-shape", "3,32,32", "--experiment", exp,
        "--stop-when", "accuracy_drop > 0.10", "--", *train_args,
    )  # fmt: skip
    tdump("experiments", "show", exp)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed (pip install 'tdump[plot]'); no figure drawn")
        return
    tdump("experiments", "plot", exp, "-o", f"{args.out}/curve.png")
    print(f"\nEverything is in {args.out}/: experiment/ (one folder per round), curve.png")


if __name__ == "__main__":
    main()
