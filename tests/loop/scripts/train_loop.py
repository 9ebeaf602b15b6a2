"""A training script for `tdump loop` tests: the interface a user's script needs.

Starts from ``TDUMP_INIT`` (a tdump checkpoint) when set, else builds ``TinyNet``;
trains a few deterministic steps on synthetic data; reports eval accuracy and loss
with ``tdump.report`` (unless ``--no-report``; with ``--functional-eval`` as well,
the eval loss is computed without the loss module, so capture sees no eval logits and
the round has no accuracy at all); saves ``model.state_dict()`` to
``TDUMP_OUT`` (unless ``--no-save``; ``--ignore-init`` builds a fresh TinyNet in
every round, as a script that forgets ``TDUMP_INIT`` does; ``--tokens`` trains
``TokenNet``, whose patch-embedding conv the surgery never prunes; ``--skip``
``SkipNet``, whose shortcut conv has no Taylor score but prunes with ``conv2``). With
``LOOP_TEST_CRASH_ROUND=R`` in the environment it exits with status 3 in round R
(the crash test).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tinynet import SkipNet, TinyNet, TokenNet
from torch import nn

import tdump


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.5
    x[:, 0] *= 1 + y.view(-1, 1, 1).float()
    return x, y


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--functional-eval", action="store_true", help="eval loss not by the module")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--tokens", action="store_true", help="train TokenNet instead of TinyNet")
    p.add_argument("--skip", action="store_true", help="train SkipNet instead of TinyNet")
    p.add_argument("--ignore-init", action="store_true", help="a script that forgets TDUMP_INIT")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rnd = int(os.environ.get("TDUMP_ROUND", "0"))
    if rnd == int(os.environ.get("LOOP_TEST_CRASH_ROUND", "-1")):
        print(f"injected failure in round {rnd}", file=sys.stderr)
        sys.exit(3)
    init = None if args.ignore_init else os.environ.get("TDUMP_INIT")
    net = TokenNet if args.tokens else SkipNet if args.skip else TinyNet
    model = tdump.load(init, arch=net) if init else net()  # our own class: named here
    x, y = data(256, seed=1)
    xt, yt = data(128, seed=2)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(args.steps):
        i = (step * 32) % len(x)
        opt.zero_grad()
        loss = crit(model(x[i : i + 32]), y[i : i + 32])
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(xt)
        loss = nn.functional.cross_entropy(logits, yt) if args.functional_eval else crit(logits, yt)
    if not args.no_report:
        tdump.report(accuracy=(logits.argmax(1) == yt).float().mean(), loss=loss)
    if not args.no_save:
        torch.save(model.state_dict(), os.environ["TDUMP_OUT"])


if __name__ == "__main__":
    main()
