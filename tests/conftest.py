"""Shared fixtures. Each stage's engineer appends its own section below."""

from __future__ import annotations

# ----------------------------------------------------------------------------- readers
# A small dump written with StoreWriter directly (no torch, no hook), with what was
# written kept alongside for comparison.
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tdump._format import StoreWriter

_CONV = {"collection": "weights", "kind": "parameter", "module": "conv1"}
_SMALL_MODULES = {
    "": {"type": "tests.Net", "params": {}, "buffers": {}, "config": {}},
    "conv1": {
        "type": "torch.nn.modules.conv.Conv2d",
        "params": {"weight": [4, 1, 3, 3], "bias": [4]},
        "buffers": {},
        "config": {"in_channels": 1, "out_channels": 4, "kernel_size": [3, 3]},
    },
    "relu": {"type": "torch.nn.modules.activation.ReLU", "params": {}, "buffers": {}, "config": {}},
}


@dataclass
class SmallDump:
    """A dump written by :func:`write_small_dump` and what went into it.

    ``values[(mode, name, step)]`` is the array written (before batch padding);
    ``steps[mode]`` the committed steps; ``batch[mode]`` the batch sizes.
    """

    path: str
    values: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict)
    steps: dict[str, list[int]] = field(default_factory=dict)
    batch: dict[str, list[int]] = field(default_factory=dict)
    writer: StoreWriter | None = None

    def names(self, mode: str) -> list[str]:
        return sorted({n for m, n, _ in self.values if m == mode})


def _write(dump: SmallDump, w: StoreWriter, mode: str, step: int, bs: int, rng: Any) -> None:
    rec = w.next_record(mode)
    tensors: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]] = {
        "relu.output_0": (
            rng.random((bs, 4, 6, 6), dtype=np.float32),
            ("batch", "channel", "y", "x"),
            {"collection": "activations", "kind": "output", "module": "relu", "call": 0},
        ),
        "loss.output_0": (
            np.asarray(rng.random(), dtype=np.float32),
            (),
            {"collection": "losses", "kind": "loss", "module": "loss", "call": 0},
        ),
    }
    if mode == "train":
        tensors.update(
            {
                "conv1.weight": (
                    rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                    ("out_channel", "in_channel", "ky", "kx"),
                    _CONV,
                ),
                "conv1.weight.grad": (
                    rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                    ("out_channel", "in_channel", "ky", "kx"),
                    {**_CONV, "collection": "gradients", "kind": "parameter_grad"},
                ),
                "conv1.bias": (
                    rng.standard_normal(4).astype(np.float32),
                    ("channel",),
                    {**_CONV, "collection": "biases"},
                ),
                # same module node as output_0, other channel count: dims must not clash
                "relu.output_1": (
                    rng.random((bs, 8, 3, 3), dtype=np.float32),
                    ("batch", "channel", "y", "x"),
                    {"collection": "activations", "kind": "output", "module": "relu", "call": 1},
                ),
                "relu.output_0.grad": (
                    rng.standard_normal((bs, 4, 6, 6)).astype(np.float32),
                    ("batch", "channel", "y", "x"),
                    {"collection": "activation_gradients", "kind": "output_grad", "module": "relu"},
                ),
                # integer labels, zeros included (zero is also the integer fill value)
                "loss.input_0.1": (
                    np.arange(bs, dtype=np.int64) % 3,
                    ("batch",),
                    {"collection": "loss_inputs", "kind": "loss_input", "module": "loss"},
                ),
                "scalars.epoch": (
                    np.asarray(0, dtype=np.int64),
                    (),
                    {"collection": "scalars", "kind": "scalar", "module": ""},
                ),
            }
        )
        if rec != 1:  # a tensor not saved at every record
            tensors["scalars.lr"] = (
                np.asarray(0.1 / (rec + 1), dtype=np.float64),
                (),
                {"collection": "scalars", "kind": "scalar", "module": ""},
            )
    for name, (value, dims, attrs) in tensors.items():
        w.write_tensor(mode, rec, name, value, dims=dims, attrs=attrs)
        dump.values[(mode, name, step)] = value
    w.commit(mode, rec, step=step, batch_size=bs)
    dump.steps.setdefault(mode, []).append(step)
    dump.batch.setdefault(mode, []).append(bs)


def write_small_dump(
    path: str, *, train_steps: tuple[int, ...] = (0, 10, 20), seed: int = 0
) -> SmallDump:
    """Write the small dump at ``path`` (local or fsspec URL); the writer stays open.

    train: steps ``train_steps``, batch 4 except the last record (2: a partial batch);
    eval: steps 0 and 5, batch 3. Extend it with :func:`append_train`.
    """
    rng = np.random.default_rng(seed)
    w = StoreWriter.create(path, config={"include_regex": ".*", "save_interval": 10})
    w.update_meta(modules=_SMALL_MODULES, calls={"train": []})
    dump = SmallDump(path=path, writer=w)
    for i, step in enumerate(train_steps):
        _write(dump, w, "train", step, 2 if i == len(train_steps) - 1 else 4, rng)
    for step in (0, 5):
        _write(dump, w, "eval", step, 3, rng)
    dump._rng = rng  # type: ignore[attr-defined]
    return dump


def append_train(dump: SmallDump, step: int, bs: int = 4) -> None:
    """Commit one more train record to ``dump`` (a store still being written)."""
    assert dump.writer is not None
    _write(dump, dump.writer, "train", step, bs, dump._rng)  # type: ignore[attr-defined]


@pytest.fixture
def small_dump(tmp_path: Path) -> SmallDump:
    """The small dump on local disk (``tmp_path/dump.zarr``)."""
    return write_small_dump(str(tmp_path / "dump.zarr"))


@pytest.fixture
def memory_dump() -> SmallDump:
    """The small dump in fsspec's in-memory filesystem (a unique ``memory://`` URL)."""
    return write_small_dump(f"memory://tests/{uuid.uuid4().hex}/dump.zarr")


def make_bad_path(base: str, kind: str) -> tuple[str, type[Exception]]:
    """A path under ``base`` that readers must refuse, and the error they raise.

    ``kind``: ``missing`` (no such path), ``not_a_dump`` (a plain directory),
    ``plain_zarr`` (a Zarr group tdump did not write), ``newer`` (format version 99).
    """
    import json
    import os

    from tdump.errors import DumpNotFoundError, FormatVersionError, NotADumpError

    if kind == "missing":
        return os.path.join(base, "nope.zarr"), DumpNotFoundError
    if kind == "not_a_dump":
        path = os.path.join(base, "plain_dir")
        os.makedirs(path, exist_ok=True)
        Path(path, "notes.txt").write_text("hello\n")
        return path, NotADumpError
    if kind == "plain_zarr":
        import zarr

        path = os.path.join(base, "plain.zarr")
        zarr.open_group(path, mode="w").attrs["x"] = 1
        return path, NotADumpError
    if kind == "newer":
        path = os.path.join(base, "newer.zarr")
        write_small_dump(path)
        meta_path = Path(path, "zarr.json")
        meta = json.loads(meta_path.read_text())
        meta["attributes"]["tdump"]["format_version"] = 99
        meta_path.write_text(json.dumps(meta))
        return path, FormatVersionError
    raise ValueError(kind)
