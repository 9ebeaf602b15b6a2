"""Opening a dump with many tensors: what ``xr.open_dataset`` and ``tdump ls`` wait for.

A detector (torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn``, random weights,
synthetic boxes) is trained for ``--steps`` steps under an explicit hook that saves the
seed's selection and every activation module's output with its gradient at each step:
about 600 tensors. Then, in this one process, warm page cache, median of ``--repeat``:

* opening every tensor array **one by one through the rank group**, as readers did
  before (each open also reread the rank group's metadata, which holds the module tree);
* one by one **from the root** (``StoreReader.array`` on a reader that keeps nothing);
* **all at once** (``StoreReader.arrays``: their metadata read concurrently);
* the whole ``xr.open_dataset(dump, engine="tdump")`` and ``tdump ls dump`` (a process).

    python benchmarks/open_speed.py --save benchmarks/results/open_speed.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import SEED_INCLUDE, timed  # noqa: E402


def record(out: str, steps: int) -> None:
    import torch
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from tdump.capture import Hook

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        num_classes=3, weights=None, weights_backbone=None
    ).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = Hook(out, include_regex=SEED_INCLUDE, include_activations=True, save_interval=1)
    hook.register_module(model)
    for _ in range(steps):
        imgs = [torch.rand(3, 128, 128) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}]
        loss = sum(model(imgs, targets * 2).values())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    hook.close()


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()

    import xarray as xr
    import zarr

    from tdump._format import StoreReader
    from tdump._names import encode_name, rank_group

    with tempfile.TemporaryDirectory() as tmp:
        dump = str(Path(tmp, "det.zarr"))
        record(dump, args.steps)
        names = StoreReader(dump).tensor_names("train")

        def through_rank_group() -> None:
            reader = StoreReader(dump)
            for name in names:
                group = reader.root[rank_group(0)]
                assert isinstance(group, zarr.Group)
                group[f"train/tensors/{encode_name(name)}"]

        def from_root() -> None:
            reader = StoreReader(dump)
            for name in names:
                reader.array("train", name)

        def at_once() -> None:
            StoreReader(dump).arrays("train", names)

        rows = [
            ("one by one through the rank group (before)", median_seconds(through_rank_group, args.repeat)),
            ("one by one from the root", median_seconds(from_root, args.repeat)),
            ("all at once (StoreReader.arrays)", median_seconds(at_once, args.repeat)),
            ("xr.open_dataset(engine='tdump')", median_seconds(
                lambda: xr.open_dataset(dump, engine="tdump"), args.repeat)),
            ("tdump ls (whole process)", statistics.median(
                timed([sys.executable, "-m", "tdump", "ls", dump]) for _ in range(args.repeat))),
        ]  # fmt: skip
        base = rows[0][1]
        lines = [
            f"{len(names)} tensors, {args.steps} saved steps, median of {args.repeat}, warm cache",
            f"{'':48} {'seconds':>8} {'before / this':>14}",
        ]
        for label, secs in rows[:3]:
            lines.append(f"{label:48} {secs:8.3f} {base / secs:13.1f}x")
        for label, secs in rows[3:]:
            lines.append(f"{label:48} {secs:8.3f}")
    text = "\n".join(lines)
    print(text)
    if args.save:
        args.save.write_text(
            f"$ python benchmarks/open_speed.py  # {time.strftime('%Y-%m-%d')}\n{text}\n"
        )


if __name__ == "__main__":
    main()
