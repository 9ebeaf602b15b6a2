"""Dumps with exact values for the rule tests, written with StoreWriter (no torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tdump._format import StoreWriter

RELU_MODULES = {
    "": {"type": "tests.Net", "params": {}, "buffers": {}, "config": {}},
    "conv": {"type": "torch.nn.modules.conv.Conv2d", "params": {}, "buffers": {}, "config": {}},
    "relu": {"type": "torch.nn.modules.activation.ReLU", "params": {}, "buffers": {}, "config": {}},
}

_ATTRS = {
    "weights": ("parameter", ("out_feature", "in_feature")),
    "gradients": ("parameter_grad", ("out_feature", "in_feature")),
    "losses": ("loss", ()),
    "scalars": ("scalar", ()),
    "activations": ("output", ("batch", "channel", "y", "x")),
}


def tensor(collection: str, value: Any, module: str = "fc") -> tuple[np.ndarray, dict[str, Any]]:
    """A value and its attributes as the hook writes them for ``collection``."""
    kind, dims = _ATTRS.get(collection, ("loss_input", ("batch", "class")))
    arr = np.asarray(value)
    attrs = {"collection": collection, "kind": kind, "module": module, "dims": dims[: arr.ndim]}
    return arr, attrs


def write(
    path: str,
    records: Mapping[str, Sequence[tuple[int, Mapping[str, tuple[np.ndarray, dict[str, Any]]]]]],
    *,
    modules: Mapping[str, Any] | None = None,
) -> StoreWriter:
    """Write ``{mode: [(step, {name: (value, attrs)}), ...]}`` and commit each record.

    Returns the open writer (more records can follow).
    """
    w = StoreWriter.create(path)
    if modules is not None:
        w.update_meta(modules=dict(modules))
    for mode, recs in records.items():
        for step, tensors in recs:
            append(w, mode, step, tensors)
    return w


def append(
    w: StoreWriter, mode: str, step: int, tensors: Mapping[str, tuple[np.ndarray, dict[str, Any]]]
) -> None:
    """Commit one record of ``mode`` at ``step``."""
    rec = w.next_record(mode)
    batch = -1
    for name, (value, attrs) in tensors.items():
        attrs = dict(attrs)
        dims = attrs.pop("dims")
        if dims[:1] == ("batch",):
            batch = value.shape[0]
        w.write_tensor(mode, rec, name, value, dims=dims, attrs=attrs)
    w.commit(mode, rec, step=step, batch_size=batch)
