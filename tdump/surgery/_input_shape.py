"""The model's input shape, as a dump recorded it or worked out from its dataflow (for FLOPs).

A dump records, per mode, the shapes of the first traced forward pass's tensor
arguments (``input_shapes``, docs/FORMAT.md): the first one, batch dropped, is the
input shape. Dumps written before that was recorded only have the module calls:
their output shapes and which call produced each input (``"<input>"`` for the model's
input; ``calls``). Then the shape is taken from the calls that read the input: a
shape-keeping module (BatchNorm, an activation, ``Identity``) reading it gives it
exactly; a conv or pooling layer gives, per spatial dim, the range of sizes its output
size comes from (a stride-2 stem maps 31 and 32 to 16). The calls that read the input
narrow the range together, and the size picked from it is the one divisible by the
largest power of two (32, not 31; 224, not 223): the size a user picks, and the one
whose output is exactly size / stride. FLOPs depend only on output sizes, so every
size in the range counts the same.

Examples
--------
>>> calls = [{"name": "conv1.output_0", "module": "conv1", "call": 0, "inputs": ["<input>"],
...           "shape": [8, 64, 16, 16]}]
>>> conv = {"type": "torch.nn.modules.conv.Conv2d", "config": {"in_channels": 3,
...         "kernel_size": [7, 7], "stride": [2, 2], "padding": [3, 3]}}
>>> input_shape_from_calls(calls, {"conv1": conv})
[3, 32, 32]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MoreInput",
    "dump_meta",
    "input_shape_from_calls",
    "more_inputs",
    "recorded_input_shape",
    "recorded_more_inputs",
]

#: Module classes (``torch.nn``) whose output has their input's shape.
_SHAPE_KEEPING = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "GroupNorm",
        "Identity",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "GELU",
        "SiLU",
        "Mish",
        "Hardswish",
        "Hardsigmoid",
        "Sigmoid",
        "Tanh",
    }
)

Bounds = list[tuple[int, int]]  # per spatial dim, the smallest and largest input size


def _per_dim(value: Any, dims: int, default: int) -> list[int]:
    if value is None or isinstance(value, str):
        return [default] * dims
    if isinstance(value, (int, float)):
        return [int(value)] * dims
    values = [int(v) for v in value]
    return values if len(values) == dims else [values[0]] * dims


def _reads_input(module: Mapping[str, Any], out: Sequence[int]) -> tuple[int, Bounds] | None:
    """``(channels, bounds)`` of the input a call of ``module`` with output shape ``out`` read."""
    kind = str(module.get("type") or "")
    cfg = module.get("config") or {}
    dims = len(out) - 2
    if dims < 1:
        return None
    if kind.startswith("torch.nn.modules.") and kind.rpartition(".")[2] in _SHAPE_KEEPING:
        return int(out[1]), [(int(o), int(o)) for o in out[2:]]
    if "kernel_size" not in cfg:
        return None
    k = _per_dim(cfg.get("kernel_size"), dims, 1)
    s = _per_dim(cfg.get("stride") or cfg.get("kernel_size"), dims, 1)
    d = _per_dim(cfg.get("dilation"), dims, 1)
    pad = cfg.get("padding")
    if pad == "same":
        bounds = [(int(o), int(o)) for o in out[2:]]
    else:
        p = _per_dim(pad, dims, 0)
        # out = floor((in + 2p - d(k-1) - 1) / s) + 1, solved for in
        lows = [
            (o - 1) * st - 2 * pd + dl * (kk - 1) + 1
            for o, st, pd, dl, kk in zip(out[2:], s, p, d, k, strict=True)
        ]
        bounds = [(lo, lo + st - 1) for lo, st in zip(lows, s, strict=True)]
    channels = int(cfg.get("in_channels", out[1]))  # pooling keeps the channels
    return channels, bounds


def _likely(lo: int, hi: int) -> int:
    """The size in ``lo..hi`` divisible by the largest power of two (the smallest on a tie)."""
    return max(range(lo, hi + 1), key=lambda v: ((v & -v) if v > 0 else 0, -v))


def input_shape_from_calls(
    calls: Sequence[Mapping[str, Any]], modules: Mapping[str, Mapping[str, Any]]
) -> list[int] | None:
    """The input shape (batch excluded) the calls reading ``"<input>"`` agree on, if any."""
    channels: int | None = None
    bounds: Bounds | None = None
    for call in calls:
        if call.get("inputs") != ["<input>"]:
            continue
        out = call.get("shape") or []
        found = _reads_input(modules.get(str(call.get("module", ""))) or {}, out)
        if found is None:
            continue
        ch, b = found
        if bounds is None:
            channels, bounds = ch, b
            continue
        if ch != channels or len(b) != len(bounds):
            return None  # calls that disagree: no shape rather than a wrong one
        bounds = [(max(a[0], c[0]), min(a[1], c[1])) for a, c in zip(bounds, b, strict=True)]
    if channels is None or bounds is None or any(lo > hi or hi < 1 for lo, hi in bounds):
        return None
    return [channels, *(_likely(max(lo, 1), hi) for lo, hi in bounds)]


def _first_input(shapes: Any) -> list[int] | None:
    """``[C, *spatial]`` of the first recorded input shape, if it is an image-like batch."""
    if not isinstance(shapes, list) or not shapes or not isinstance(shapes[0], list):
        return None
    first = shapes[0]
    if len(first) < 3 or not all(isinstance(n, int) and n > 0 for n in first):
        return None
    return [int(n) for n in first[1:]]


def dump_meta(dump: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta of the dump's first rank (rank 0 in a single-process run)."""
    from tdump._format import StoreReader

    reader = StoreReader(os.fspath(dump))
    ranks = reader.ranks()
    return reader.meta(ranks[0] if ranks else 0)


def _input_mode(recorded: Mapping[str, Any]) -> str | None:
    """The mode (``train`` first) whose recorded first input is an image-like batch."""
    for mode in ("train", *sorted(m for m in recorded if m != "train")):
        if _first_input(recorded.get(mode)):
            return mode
    return None


def recorded_input_shape(dump: str | os.PathLike[str]) -> list[int] | None:
    """The model's input shape (batch excluded) as the dump recorded it, if it shows one.

    Uses rank 0's ``input_shapes`` (the first tensor argument of the first traced
    forward, ``train`` first); a dump without them (written before they were recorded)
    has the shape worked back from its ``calls`` (see the module docstring).
    """
    meta = dump_meta(dump)
    recorded = meta.get("input_shapes") or {}
    mode = _input_mode(recorded)
    if mode is not None:
        return _first_input(recorded[mode])
    calls = meta.get("calls") or {}  # dumps written before input_shapes was recorded
    modules = meta.get("modules") or {}
    for mode in ("train", *sorted(m for m in calls if m != "train")):
        shape = input_shape_from_calls(calls.get(mode) or [], modules)
        if shape:
            return shape
    return None


#: A model input after the first: its shape (batch 1 where it had the batch) and dtype.
MoreInput = tuple[tuple[int, ...], str]


def more_inputs(shapes: Any, dtypes: Any) -> list[MoreInput]:
    """The tensor arguments after the first, as recorded: a leading dim equal to the
    first argument's batch becomes 1, and a dtype not recorded is ``float32``.

    >>> more_inputs([[32, 3, 8, 8], [32], [5, 2]], ["float32", "int64"])
    [((1,), 'int64'), ((5, 2), 'float32')]
    """
    if not isinstance(shapes, list) or len(shapes) < 2 or not isinstance(shapes[0], list):
        return []
    batch = shapes[0][0] if shapes[0] else None
    names = dtypes if isinstance(dtypes, list) else []
    out: list[MoreInput] = []
    for i, shape in enumerate(shapes[1:], start=1):
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            return []  # not a shape: no extra inputs rather than wrong ones
        dims = (1, *shape[1:]) if shape and shape[0] == batch else tuple(shape)
        dtype = names[i] if i < len(names) and isinstance(names[i], str) else "float32"
        out.append((tuple(int(n) for n in dims), dtype))
    return out


def recorded_more_inputs(dump: str | os.PathLike[str]) -> list[MoreInput]:
    """The model's tensor arguments after the first (a denoiser's timesteps), as recorded
    with the input :func:`recorded_input_shape` reads; empty for a one-input model."""
    meta = dump_meta(dump)
    recorded = meta.get("input_shapes") or {}
    mode = _input_mode(recorded)
    if mode is None:
        return []
    return more_inputs(recorded[mode], (meta.get("input_dtypes") or {}).get(mode))
