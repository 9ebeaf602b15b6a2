"""The inputs `tdump prune` counts FLOPs at: --input-shape, else the dump's recorded
input (and a ``forward(x, t)``'s other arguments), else a fallback said in a note.

Examples
--------
>>> known_input_shape((3, 32, 32), None, "no dump")
((3, 32, 32), '--input-shape')
>>> known_input_shape(None, None, "the ranks name no dump")
(None, 'the ranks name no dump; give the dump with --dump DUMP or the shape with --input-shape C,H,W')
>>> from torch import nn
>>> print(flops_input_shape((None, "the dump d.zarr records no input shape; " + _ONLY_SHAPE),
...                         nn.Conv2d(1, 2, 3))[2])
FLOPs use the fallback input shape 1x224x224: the dump d.zarr records no input shape; give the shape with --input-shape C,H,W
"""

from __future__ import annotations

from typing import Any

__all__ = ["flops_input_shape", "known_input_shape", "more_inputs"]

#: The remedy when a dump was read and held no shape (a detector, called with a list of
#: images): another --dump would not help.
_ONLY_SHAPE = "give the shape with --input-shape C,H,W"
_DUMP_OR_SHAPE = "give the dump with --dump DUMP or the shape with --input-shape C,H,W"


def known_input_shape(
    shape: tuple[int, ...] | None, dump: str | None, why_none: str
) -> tuple[tuple[int, ...] | None, str]:
    """``--input-shape`` (parsed), else the recorded input's (from ``dump``), and where from.

    Without either, ``None`` and why not, with what to give (``why_none``: why there
    is no dump to read).
    """
    if shape:
        return shape, "--input-shape"
    why = f"{why_none}; {_DUMP_OR_SHAPE}"
    if dump is not None:
        from tdump.errors import TdumpError
        from tdump.surgery._input_shape import recorded_input_shape

        try:
            recorded = recorded_input_shape(dump)
        except TdumpError as exc:  # a damaged dump only means no shape: said below
            recorded, why = None, f"the dump {dump} cannot be read ({exc}); {_DUMP_OR_SHAPE}"
        else:
            why = f"the dump {dump} records no input shape; {_ONLY_SHAPE}"
        if recorded:
            return tuple(recorded), f"the shape recorded in {dump}"
    return None, why


def flops_input_shape(
    known: tuple[tuple[int, ...] | None, str], model: Any
) -> tuple[tuple[int, ...], str, str | None]:
    """The input shape for FLOPs, where it came from, and a note when it is the fallback.

    ``known`` is :func:`known_input_shape`'s answer; without a shape there, the first
    conv's in-channels x 224 x 224, said in a note.
    """
    shape, why = known
    if shape:
        return shape, why, None
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    fallback = (int(first.in_channels) if first is not None else 3, 224, 224)
    text = "x".join(map(str, fallback))
    note = f"FLOPs use the fallback input shape {text}: {why}"
    return fallback, f"the fallback shape {text}", note


def more_inputs(dump: str | None) -> list[tuple[tuple[int, ...], str]]:
    """A ``forward(x, t)``'s other arguments as ``dump`` recorded them, for FLOPs."""
    if dump is None:
        return []
    from tdump.errors import TdumpError
    from tdump.surgery._input_shape import recorded_more_inputs

    try:
        return recorded_more_inputs(dump)
    except TdumpError:  # a damaged dump: the input shape's note says so
        return []
