"""What a dump holds, as one JSON-ready dict: the data behind ``tdump ls``.

The keys are stable (documented in ``docs/reading.md``); new keys may be added.

Examples
--------
>>> import numpy as np
>>> from tdump._format import StoreWriter
>>> w = StoreWriter.create("memory://doc/info.zarr")
>>> w.write_tensor("train", 0, "fc.weight", np.zeros((4, 4), "f4"), dims=("out_feature", "in_feature"),
...                attrs={"collection": "weights", "kind": "parameter", "module": "fc"})
>>> w.commit("train", 0, step=0, batch_size=2)
>>> info = summarize("memory://doc/info.zarr")
>>> info["modes"]["train"]["steps"], info["tensors"][0]["logical_bytes"]
([0], 64)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from tdump._format import FORMAT_NAME, StoreReader
from tdump._names import dump_path, no_mode_steps
from tdump._version import __version__
from tdump.errors import MissingTensorError, SelectionError, compile_regex

__all__ = ["SCHEMA_VERSION", "summarize"]

#: Version of the ``tdump ls --json`` layout (bumped only when a key changes meaning or goes away).
SCHEMA_VERSION = 1


def _ratio(logical: int, stored: int) -> float | None:
    return round(logical / stored, 3) if stored else None


def summarize(
    path: str | os.PathLike[str],
    *,
    rank: int | None = None,
    mode: str | None = None,
    regex: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe the dump at ``path``: ranks, modes and steps, tensors, sizes, collections.

    Parameters
    ----------
    path
        Local path or fsspec URL of the dump.
    rank
        Only this rank (default: every rank in the store).
    mode
        Only this mode (default: every mode with records).
    regex
        Only tensors whose name matches (``re.search``).
    storage_options
        Passed to fsspec for URLs.

    Returns
    -------
    dict
        See "tdump ls --json" in ``docs/reading.md``.

    Raises
    ------
    SelectionError
        ``regex`` is invalid or matches no tensor.
    MissingTensorError
        ``rank`` or ``mode`` is not in the dump.
    """
    # a snapshot: each array is opened once, not once per question asked about it
    reader = (
        path
        if isinstance(path, StoreReader)
        else StoreReader(dump_path(path), storage_options, snapshot=True)
    )
    pattern = compile_regex(regex)
    ranks = reader.ranks()
    if rank is not None:
        if rank not in ranks:
            raise MissingTensorError(
                f"{reader.path} has no data for rank {rank}; ranks present: {ranks or 'none'}"
            )
        ranks = [rank]
    out_ranks: list[dict[str, Any]] = []
    modes_out: dict[str, dict[str, Any]] = {}
    tensors: list[dict[str, Any]] = []
    all_names: set[str] = set()
    for r in ranks:
        meta = reader.meta(r)
        present = reader.modes(r)
        if mode is not None and mode not in present and len(ranks) == 1:
            raise MissingTensorError(no_mode_steps(reader.path, mode, present))
        r_modes = [m for m in present if mode in (None, m)]
        out_ranks.append(
            {
                "rank": r,
                "world_size": meta.get("world_size"),
                "writer": meta.get("writer"),
                "created": meta.get("created"),
                "modes": r_modes,
            }
        )
        for m in r_modes:
            rec = reader.records(m, r)  # one snapshot: every count below uses these records
            steps = [int(s) for s in rec["step"]]
            entry = modes_out.setdefault(m, {"records": 0, "steps": [], "examples": 0})
            entry["records"] += len(steps)
            entry["steps"] = sorted(set(entry["steps"]) | set(steps))
            entry["examples"] += int(np.clip(rec["batch_size"], 0, None).sum())
            names = reader.tensor_names(m, r)
            all_names.update(names)
            chosen = [n for n in names if pattern is None or pattern.search(n)]
            # their metadata, then their shard indexes, read at once
            sizes = reader.record_sizes_many(m, chosen, r, committed=len(steps))
            tensors.extend(
                _tensor_info(reader, m, name, r, rec["step"], sizes[name]) for name in chosen
            )
    if pattern is not None and not tensors:
        raise SelectionError(
            f"regex {regex!r} matches none of the {len(all_names)} tensors in {reader.path}"
        )
    for entry in modes_out.values():
        steps = entry["steps"]
        entry["first_step"] = steps[0] if steps else None
        entry["last_step"] = steps[-1] if steps else None
    collections: dict[str, list[str]] = {}
    for t in tensors:
        collections.setdefault(str(t["collection"]), []).append(t["name"])
    stored = sum(t["stored_bytes"] for t in tensors)
    logical = sum(t["logical_bytes"] for t in tensors)
    return {
        "schema_version": SCHEMA_VERSION,
        "path": reader.path,
        "format": FORMAT_NAME,
        "format_version": reader.format_version,
        "reader": f"tdump {__version__}",
        "ranks": out_ranks,
        "modes": modes_out,
        "tensors": tensors,
        "collections": {k: sorted(set(v)) for k, v in sorted(collections.items())},
        "totals": {
            "tensors": len({t["name"] for t in tensors}),
            "stored_bytes": stored,
            "logical_bytes": logical,
            "ratio": _ratio(logical, stored),
            "store_bytes": sum(reader.sizes(reader.all_keys()).values()),
        },
    }


def _tensor_info(
    reader: StoreReader,
    mode: str,
    name: str,
    rank: int,
    committed_steps: np.ndarray,
    sizes: dict[int, int],
) -> dict[str, Any]:
    """One tensor's row, counting only the records in ``committed_steps`` (a live writer
    may have committed more, or renamed files, since they were read); ``sizes`` are its
    records' stored bytes (:meth:`StoreReader.record_sizes`) below that count."""
    arr = reader.array(mode, name, rank)
    attrs = reader.tensor_attrs(mode, name, rank)
    saved = np.array(sorted(sizes), dtype=np.int64)
    steps = committed_steps[saved]
    shape = [int(s) for s in arr.shape[1:]]
    logical = int(len(saved) * math.prod(shape) * np.dtype(arr.dtype).itemsize)
    stored = sum(sizes.values())
    return {
        "name": name,
        "mode": mode,
        "rank": rank,
        "collection": attrs.get("collection"),
        "kind": attrs.get("kind"),
        "module": attrs.get("module"),
        "shape": shape,
        "dims": list(attrs.get("dims", [])),
        "dtype": str(arr.dtype),
        "source_dtype": attrs.get("source_dtype"),
        "storage_dtype": attrs.get("storage_dtype"),
        "reduction": attrs.get("reduction"),
        "records": len(saved),
        "first_step": int(steps[0]) if len(steps) else None,
        "last_step": int(steps[-1]) if len(steps) else None,
        "stored_bytes": stored,
        "logical_bytes": logical,
        "ratio": _ratio(logical, stored),
    }
