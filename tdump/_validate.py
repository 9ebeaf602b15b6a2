"""Validation of what readers read from a store (docs/FORMAT.md, "Validation by readers").

Every check turns damage into one :class:`~tdump.errors.NotADumpError` line naming the
part, never a traceback from zarr or numcodecs, and never a wrong value.

Examples
--------
>>> import numpy as np
>>> check_steps("run.zarr", np.array([0, 10, 5]), "rank0/train/records/step")
Traceback (most recent call last):
...
tdump.errors.NotADumpError: run.zarr is damaged: rank0/train/records/step does not increase at record 2 (10 then 5); re-record it or restore a copy
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from tdump.errors import NotADumpError, first_line

__all__ = [
    "DAMAGE",
    "META_TYPES",
    "call_ok",
    "check_steps",
    "check_tensor_array",
    "damaged",
    "damaged_chunk",
    "sizes",
]

#: What any error opening or decoding a damaged node can raise (zarr, json, numcodecs, blosc).
#: numcodecs' Blosc raises SystemError for a header claiming 2 GiB or more of decoded bytes.
DAMAGE = (
    ValueError,
    TypeError,
    KeyError,
    RuntimeError,
    OSError,
    AttributeError,
    IndexError,
    SystemError,
)
#: Rank-group attributes and the JSON types they must have (``docs/FORMAT.md`` §1).
META_TYPES: dict[str, tuple[type, ...]] = {
    "rank": (int,),
    "world_size": (int,),
    "writer": (str,),
    "created": (str,),
    "config": (Mapping,),
    "modules": (Mapping,),
    "calls": (Mapping,),
    "model_outputs": (Mapping,),
}


def damaged(path: str, what: str, exc: BaseException | None = None) -> NotADumpError:
    """The one-line error for a damaged part of the dump at ``path``.

    >>> str(damaged("run.zarr", "records/step of mode 'train'", ValueError("bad size")))
    "run.zarr is damaged: records/step of mode 'train' (bad size); re-record it or restore a copy"
    """
    why = f" ({first_line(exc)})" if exc is not None else ""
    return NotADumpError(f"{path} is damaged: {what}{why}; re-record it or restore a copy")


def damaged_chunk(path: str, arr: zarr.Array, index: int, exc: BaseException) -> NotADumpError:
    """The one-line error for record ``index`` of ``arr`` that does not decode."""
    name = arr.path.rsplit("/", 1)[-1]
    mode = arr.path.split("/")[1] if arr.path.count("/") >= 3 else "?"
    return damaged(path, f"record {index} of tensor {name!r} (mode {mode!r}) does not decode", exc)


def call_ok(call: Any) -> bool:
    if not isinstance(call, Mapping):
        return False
    if not isinstance(call.get("name"), str) or not isinstance(call.get("module"), str):
        return False
    inputs = call.get("inputs", [])
    if not isinstance(inputs, list) or not all(i is None or isinstance(i, str) for i in inputs):
        return False
    summed = call.get("sum_of", [])
    return isinstance(summed, list) and all(isinstance(n, str) for n in summed)


def check_steps(path: str, steps: np.ndarray, where: str) -> None:
    """Committed steps must be non-negative and increasing (else random bytes pass as steps)."""
    if steps.size and int(steps.min()) < 0:
        i = int(np.flatnonzero(steps < 0)[0])
        raise damaged(path, f"{where} holds a negative step ({int(steps[i])}) at record {i}")
    if steps.size > 1 and not bool(np.all(np.diff(steps) > 0)):
        i = int(np.flatnonzero(np.diff(steps) <= 0)[0]) + 1
        raise damaged(
            path,
            f"{where} does not increase at record {i} ({int(steps[i - 1])} then {int(steps[i])})",
        )


def check_tensor_array(path: str, node: str, arr: zarr.Array) -> None:
    """A tensor array as the writer makes it: one record per chunk, numeric, named dims."""
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    if (
        arr.ndim < 1
        or chunks[0] != 1
        or any(c > s for c, s in zip(chunks[1:], shape[1:], strict=True))
    ):
        raise damaged(path, f"{node} has shape {list(shape)} with chunks {list(chunks)}")
    if np.dtype(arr.dtype).kind not in "biuf":
        raise damaged(path, f"{node} has data type {arr.dtype}, not a number type")
    names = arr.metadata.dimension_names  # type: ignore[union-attr]
    if names is not None and (len(names) != arr.ndim or names[0] != "record"):
        raise damaged(path, f"{node} has dimension names {list(names)}")


async def sizes(store: Any, keys: list[str]) -> list[tuple[str, int]]:
    import asyncio

    async def one(key: str) -> tuple[str, int] | None:
        try:
            return key, int(await store.getsize(key))
        except (FileNotFoundError, KeyError):
            return None  # renamed or removed since listing

    found = await asyncio.gather(*(one(k) for k in keys))
    return [f for f in found if f is not None]
