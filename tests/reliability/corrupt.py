"""Ways to damage a dump, each a function of the dump's path (the corrupt-store matrix).

Each damages one thing a reader relies on; readers must answer each with a one-line
error (or, where the damage is only in bytes nobody reads, with the right answer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: A tensor the taylor ranking of the tiny dump reads (the ReLU after the second conv).
ACT = "rank0/train/tensors/5.output_0"
STEP = "rank0/train/records/step"


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _rank_attr(key: str, value: Any) -> Callable[[str], None]:
    def damage(root: str) -> None:
        def edit(doc: dict[str, Any]) -> None:
            doc["attributes"]["tdump"][key] = value

        _edit_json(Path(root, "rank0/zarr.json"), edit)

    return damage


def _array_meta(key: str, value: Any, array: str = ACT) -> Callable[[str], None]:
    def damage(root: str) -> None:
        def edit(doc: dict[str, Any]) -> None:
            doc[key] = value

        _edit_json(Path(root, array, "zarr.json"), edit)

    return damage


def _shard(root: str) -> Path | None:
    """Format 2: the shard file holding record 1 (``None`` for a format-1 dump)."""
    p = Path(root, ACT, "c.0.0.0.0.0")
    return p if p.exists() and not Path(root, ACT, "c.1.0.0.0.0").exists() else None


def _record_1(shard: Path) -> tuple[int, int]:
    """``(offset, nbytes)`` of record 1 in ``shard`` (from its index)."""
    offset, nbytes = np.frombuffer(shard.read_bytes()[16:32], "<u8")
    return int(offset), int(nbytes)


def _chunk(root: str) -> Path:
    return Path(root, ACT, "c.1.0.0.0.0")


def garbage_chunk(root: str) -> None:
    shard = _shard(root)
    if shard is None:
        p = _chunk(root)
        p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))
        return
    offset, nbytes = _record_1(shard)
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).bytes(nbytes))


def truncated_chunk(root: str) -> None:
    shard = _shard(root)
    if shard is None:
        p = _chunk(root)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return
    offset, nbytes = _record_1(shard)
    os.truncate(shard, offset + nbytes // 2)


def empty_chunk(root: str) -> None:
    shard = _shard(root)
    if shard is None:
        _chunk(root).write_bytes(b"")
        return
    offset, _ = _record_1(shard)
    with open(shard, "r+b") as fh:  # the index says record 1 is 0 bytes long
        fh.seek(16)
        fh.write(np.array([offset, 0], "<u8").tobytes())


def truncated_step_chunk(root: str) -> None:
    p = Path(root, STEP, "c", "0")
    p.write_bytes(p.read_bytes()[:20])


def random_steps(root: str) -> None:
    p = Path(root, STEP, "c", "0")
    n = p.stat().st_size // 8
    p.write_bytes(np.random.default_rng(1).integers(-(2**62), 2**62, n).astype("<i8").tobytes())


def decreasing_steps(root: str) -> None:
    p = Path(root, STEP, "c", "0")
    steps = np.frombuffer(p.read_bytes(), "<i8").copy()
    steps[:3] = [5, 3, 1]
    p.write_bytes(steps.tobytes())


def truncated_array_json(root: str) -> None:
    p = Path(root, ACT, "zarr.json")
    p.write_text(p.read_text()[:100])


def truncated_rank_json(root: str) -> None:
    p = Path(root, "rank0/zarr.json")
    p.write_text(p.read_text()[:100])


def unknown_codec(root: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        codecs = doc["codecs"]
        if codecs[0]["name"] == "sharding_indexed":  # format 2: the codecs inside the shard
            codecs = codecs[0]["configuration"]["codecs"]
        codecs[1] = {"name": "nosuchcodec", "configuration": {}}

    _edit_json(Path(root, ACT, "zarr.json"), edit)


def escaping_separator(root: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["chunk_key_encoding"]["configuration"]["separator"] = "/../../../"

    _edit_json(Path(root, ACT, "zarr.json"), edit)


def sum_of_ints(root: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["attributes"]["tdump"]["calls"]["train"][0]["sum_of"] = [5, 6]

    _edit_json(Path(root, "rank0/zarr.json"), edit)


CORRUPTIONS: dict[str, Callable[[str], None]] = {
    "garbage_chunk": garbage_chunk,
    "truncated_chunk": truncated_chunk,
    "empty_chunk": empty_chunk,
    "truncated_step_chunk": truncated_step_chunk,
    "random_steps": random_steps,
    "decreasing_steps": decreasing_steps,
    "truncated_array_json": truncated_array_json,
    "truncated_rank_json": truncated_rank_json,
    "modules_str": _rank_attr("modules", "conv"),
    "calls_int": _rank_attr("calls", 3),
    "calls_list_of_ints": _rank_attr("calls", {"train": [1, 2, 3]}),
    "calls_top_list": _rank_attr("calls", [1, 2]),
    "sum_of_ints": sum_of_ints,
    "model_outputs_list": _rank_attr("model_outputs", ["5.output_0"]),
    "model_outputs_ints": _rank_attr("model_outputs", {"train": [5]}),
    "data_type": _array_meta("data_type", "int8"),
    "shape": _array_meta("shape", [64, 4, 6, 4, 4]),
    "shape_rank": _array_meta("shape", [64, 4, 6, 8]),
    "dimension_names": _array_meta("dimension_names", ["record", "x"]),
    "dimension_names_type": _array_meta("dimension_names", "record"),
    "unknown_codec": unknown_codec,
    "escaping_separator": escaping_separator,
}

__all__ = ["ACT", "CORRUPTIONS", "STEP"]
