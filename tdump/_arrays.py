"""Creating the ~200 tensor arrays of a first record quickly: one template per kind, re-shaped.

``zarr.Group.create_array`` costs about 3-8 ms per array (parent checks and several
file-system round trips through zarr's event loop), which is 0.6-1.6 s of writer time at
a dump's first saved step, while training competes for the same cores. Arrays of one
kind (dtype, fill value, codecs, chunk-key encoding) differ only in shape, dimension
names and attributes, so :class:`ArrayFactory` creates the first of each kind through
zarr and the rest from its metadata: re-shaped, serialised by zarr itself and written
as one ``zarr.json`` document (an atomic local file, or one ``store.set``). The
documents are exactly what zarr writes; the result is a normal :class:`zarr.Array`.

Examples
--------
>>> import numpy as np, os, tempfile, zarr
>>> grp = zarr.open_group(os.path.join(tempfile.mkdtemp(), "d.zarr"), mode="w")
>>> make = ArrayFactory(grp)
>>> kw = dict(dtype="f4", fill_value=np.nan, compressors=None, attributes={})
>>> a = make.create("a", shape=(4, 3), chunks=(1, 3), dimension_names=["r", "x"], **kw)
>>> b = make.create("b", shape=(4, 2, 5), chunks=(1, 2, 5), dimension_names=["r", "x", "y"], **kw)
>>> zarr.open_array(grp.store, path="b").shape, sorted(make.existing())
((4, 2, 5), ['a', 'b'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from tdump._atomic import write_atomic
from tdump.errors import CorruptStoreError

__all__ = ["ArrayFactory", "drop_stale_chunks", "first_shard", "regrow"]

log = logging.getLogger("tdump")


class ArrayFactory:
    """Creates arrays in ``group``; arrays of one kind after the first skip zarr's create path."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self._templates: dict[str, zarr.Array] = {}
        self._existing: set[str] | None = None

    def existing(self) -> set[str]:
        """Names of the arrays (and other members) the group holds: listed once, then tracked."""
        if self._existing is None:
            self._existing = set(self.group.keys())
        return self._existing

    def create(
        self,
        key: str,
        *,
        shape: Sequence[int],
        chunks: Sequence[int],
        dtype: Any,
        fill_value: Any,
        compressors: Any,
        dimension_names: Sequence[str],
        attributes: Mapping[str, Any],
        chunk_key_encoding: Any = None,
        config: Mapping[str, Any] | None = None,
    ) -> zarr.Array:
        """Create array ``key`` (which must not exist) and return it."""
        kind = repr((str(dtype), str(fill_value), repr(compressors), chunk_key_encoding, config))
        template = self._templates.get(kind)
        if template is None:
            arr = self.group.create_array(
                key,
                shape=tuple(shape),
                chunks=tuple(chunks),
                dtype=dtype,
                fill_value=fill_value,
                compressors=compressors,
                dimension_names=list(dimension_names),
                attributes=dict(attributes),
                chunk_key_encoding=chunk_key_encoding,
                config=dict(config or {}),  # type: ignore[arg-type]
            )
            self._templates[kind] = arr
        else:
            arr = self._from_template(template, key, shape, chunks, dimension_names, attributes)
        self.existing().add(key)
        return arr

    def create_sharded(
        self,
        key: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        fill_value: Any,
        compressors: Any,
        dimension_names: Sequence[str],
        attributes: Mapping[str, Any],
        records_per_shard: int | None = None,
    ) -> zarr.Array:
        """Create format-2 tensor array ``key``: records appended to shard files (tdump._shards).

        Each shard holds ``records_per_shard`` records (default
        :data:`~tdump._shards.SHARD_RECORDS`) as inner chunks ``(1, *row)`` encoded with
        ``bytes`` and ``compressors``; its index is at the start and has no checksum.
        Shard 0 is created (no record written) before ``zarr.json``: :func:`first_shard`.
        """
        from zarr.core.metadata.v3 import ArrayV3Metadata

        from tdump._shards import SHARD_RECORDS

        per = records_per_shard or SHARD_RECORDS
        dt = np.dtype(dtype)
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        inner: list[Any] = [little]
        if compressors == "auto":  # zarr's default for create_array
            from zarr.codecs import ZstdCodec

            compressors = (ZstdCodec(level=0),)
        for codec in compressors or ():
            if getattr(codec, "typesize", 0) is None:  # Blosc: shuffle needs the item size
                codec = dataclasses.replace(codec, typesize=dt.itemsize)
            inner.append(codec.to_dict())
        row = [int(n) for n in shape[1:]]
        document = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": [int(n) for n in shape],
            "data_type": dt.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [per, *row]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "fill_value": "NaN" if dt.kind == "f" and np.isnan(fill_value) else fill_value,
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [1, *row],
                        "codecs": inner,
                        "index_codecs": [little],
                        "index_location": "start",
                    },
                }
            ],
            "attributes": _with_shard0(dict(attributes), self.group.store),
            "dimension_names": list(dimension_names),
        }
        meta = ArrayV3Metadata.from_dict(document)  # type: ignore[arg-type]
        first_shard(self.group.store, f"{self.group.path}/{key}" if self.group.path else key, meta)
        arr = self._write(meta, key, None)
        self.existing().add(key)
        return arr

    def _from_template(
        self,
        template: zarr.Array,
        key: str,
        shape: Sequence[int],
        chunks: Sequence[int],
        dimension_names: Sequence[str],
        attributes: Mapping[str, Any],
    ) -> zarr.Array:
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.core.metadata.v3 import ArrayV3Metadata

        base = template.metadata
        assert isinstance(base, ArrayV3Metadata)  # tdump writes Zarr v3 only
        meta = dataclasses.replace(
            base,
            shape=tuple(shape),
            chunk_grid=RegularChunkGrid(chunk_shape=tuple(chunks)),
            dimension_names=tuple(dimension_names),
            attributes=dict(attributes),
        )
        return self._write(meta, key, template._async_array.config)

    def _write(self, meta: Any, key: str, config: Any) -> zarr.Array:
        """Write ``meta`` as ``key``'s ``zarr.json`` and return the array (no other I/O)."""
        path = f"{self.group.path}/{key}" if self.group.path else key
        return _put_metadata(self.group.store, path, meta, config)


def _put_metadata(store: Any, path: str, meta: Any, config: Any = None) -> zarr.Array:
    """Write ``meta`` as ``<path>/zarr.json`` (whole: atomic locally) and return that array."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    document = meta.to_buffer_dict(default_buffer_prototype())["zarr.json"]
    if isinstance(store, LocalStore):
        folder = os.path.join(str(store.root), path)
        os.makedirs(folder, exist_ok=True)
        body = document.to_bytes()
        write_atomic(os.path.join(folder, "zarr.json"), lambda fh: fh.write(body), tmp_prefix=".")
    else:
        sync(store.set(f"{path}/zarr.json", document))
    return _array(store, path, meta, config)


def _with_shard0(attributes: dict[str, Any], store: Any) -> dict[str, Any]:
    """``attributes`` saying, on a local store, that shard 0 exists before ``zarr.json``.

    ``"shard0": true`` under ``"tdump"`` lets readers take a missing shard 0 for damage
    even when later shards exist (arrays written before the key, and other stores, may
    legitimately lack it: a tensor that first appeared at a later record).
    """
    from zarr.storage import LocalStore

    if isinstance(store, LocalStore):
        attributes["tdump"] = {**attributes.get("tdump", {}), "shard0": True}
    return attributes


def first_shard(store: Any, path: str, meta: Any) -> None:
    """Create shard 0 of the local format-2 array at ``path``, no record written, unless it exists.

    Called before ``zarr.json`` names the array (a new array, or a grown one before the
    switch), so every array a reader can open has a shard file, even when a writer was
    killed before the array's first record reached it, and readers can take a missing
    shard for damage (:func:`tdump._shards.record_sizes` with ``strict``). Other stores
    and layouts: nothing.
    """
    from zarr.storage import LocalStore

    codecs: Any = getattr(meta, "codecs", ())
    if not isinstance(store, LocalStore) or [type(c).__name__ for c in codecs] != ["ShardingCodec"]:
        return
    grid = tuple(meta.chunk_grid.chunk_shape)
    shard = os.path.join(str(store.root), path, meta.encode_chunk_key((0,) * len(grid)))
    if os.path.exists(shard):
        return
    os.makedirs(os.path.dirname(shard), exist_ok=True)
    index = b"\xff" * (16 * int(grid[0]))  # every (offset, nbytes) 2**64 - 1: not written
    write_atomic(shard, lambda fh: fh.write(index), tmp_prefix=".shard.")


def _array(store: Any, path: str, meta: Any, config: Any = None) -> zarr.Array:
    """A :class:`zarr.Array` for ``meta`` at ``path`` (no I/O: nothing is written)."""
    from zarr.core.array import AsyncArray
    from zarr.core.array_spec import ArrayConfig
    from zarr.storage import StorePath

    if config is None:
        # a record equal to the fill value must still be written: readers find saved
        # records from the chunks that exist (StoreReader.saved_records)
        config = ArrayConfig.from_dict({"write_empty_chunks": True})
    return zarr.Array(AsyncArray(metadata=meta, store_path=StorePath(store, path), config=config))


# --------------------------------------------------------------------------- growth
def regrow(arr: zarr.Array, row: Sequence[int], keep: int) -> zarr.Array:
    """Rebuild tensor array ``arr`` with rows of shape ``row``, one chunk per record as before.

    A Zarr array's chunk shape is fixed when it is created, and a tensor array's chunk
    (a shard's inner chunk in format 2) is one whole record ``(1, *row)``; resizing the
    array alone would leave records larger than their chunk. So the records below
    ``keep`` that hold data are copied, padded with the fill value, into the same
    folder under the other chunk-key separator (``.`` <-> ``/``: keys the live
    ``zarr.json`` never names, so readers do not see them), and then one atomic write
    of ``zarr.json`` makes the new array live. A writer killed before that write leaves
    the old array as it was, killed after it the new one, complete; the unused keys are
    removed by the next growth or the next writer that opens the rank
    (:func:`drop_stale_chunks`). The old chunks stay until then, so a reader that opened
    the array before the switch still reads its records. Shards and codecs are kept.

    Parameters
    ----------
    arr
        A tensor array (records along axis 0), as tdump writes them.
    row
        The new row shape; no extent smaller than ``arr``'s.
    keep
        Records ``0 .. keep - 1`` are carried over (the committed ones).

    Returns
    -------
    zarr.Array
        The live array (same path, same attributes and capacity).
    """
    from zarr.core.metadata.v3 import ArrayV3Metadata

    from tdump._chunks import chunk_files

    row = tuple(int(n) for n in row)
    document = _document(arr)
    document["shape"] = [int(arr.shape[0]), *row]
    grid = document["chunk_grid"]["configuration"]
    grid["chunk_shape"] = [int(grid["chunk_shape"][0]), *row]
    for codec in document["codecs"]:
        if codec.get("name") == "sharding_indexed":
            codec["configuration"]["chunk_shape"] = [1, *row]
    separator = "/" if _separator(arr) == "." else "."
    document["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": separator}}
    meta = ArrayV3Metadata.from_dict(document)
    new = _array(arr.store, arr.path, meta)
    # leftovers of a killed growth, or the old chunks of the one before: not data
    _drop_chunks(arr.store, arr.path, separator)
    source, target = chunk_files(arr), chunk_files(new)
    for index in _held_records(arr, keep):
        try:
            old = source.read(index) if source is not None else np.asarray(arr[index])
        except (CorruptStoreError, ValueError, TypeError, RuntimeError) as exc:
            # damaged already (readers refuse it): carried over as "not saved", so
            # one bad record does not stop the recording
            log.warning("tdump: %s record %d not carried over on growth: %s", arr.path, index, exc)
            continue
        value = np.full(row, arr.fill_value, dtype=arr.dtype)
        value[tuple(slice(0, n) for n in old.shape)] = old
        if target is not None:
            target.write(index, value)
        else:
            new[index] = value
    first_shard(arr.store, arr.path, meta)  # when no record of shard 0 was carried over
    return _put_metadata(arr.store, arr.path, meta)


def drop_stale_chunks(arr: zarr.Array) -> None:
    """Remove ``arr``'s chunk keys under the separator it does not use (see :func:`regrow`)."""
    separator = _separator(arr)
    if separator:
        _drop_chunks(arr.store, arr.path, "/" if separator == "." else ".")


def _document(arr: zarr.Array) -> dict[str, Any]:
    """``arr``'s ``zarr.json`` as a JSON object."""
    from zarr.core.buffer import default_buffer_prototype

    body = arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]
    return dict(json.loads(body.to_bytes()))


def _separator(arr: zarr.Array) -> str:
    """The chunk-key separator of a ``default``-encoded array (``""`` for another encoding)."""
    encoding = arr.metadata.chunk_key_encoding  # type: ignore[union-attr]
    if getattr(encoding, "name", "default") != "default":
        return ""
    sep = getattr(encoding, "separator", "/")
    return str(getattr(sep, "value", sep))


def _keys(store: Any, path: str) -> list[str]:
    """Every key below the array at ``path`` (stores list by path segments: list the folder)."""
    from zarr.core.sync import sync

    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(f"{path}/")]

    return list(sync(collect()))


def _drop_chunks(store: Any, path: str, separator: str) -> None:
    """Delete the chunk keys ``c<separator>...`` of the array at ``path`` (any store)."""
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    if isinstance(store, LocalStore):
        folder = os.path.join(str(store.root), path)
        if separator == "/":
            shutil.rmtree(os.path.join(folder, "c"), ignore_errors=True)
        elif os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith("c."):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
        return
    prefix = f"{path}/c{separator}"
    doomed = [k for k in _keys(store, path) if k.startswith(prefix)]

    async def delete() -> None:
        import asyncio

        await asyncio.gather(*(store.delete(k) for k in doomed))

    if doomed:
        sync(delete())


def _held_records(arr: zarr.Array, keep: int) -> list[int]:
    """Records below ``keep`` that hold data in ``arr`` (its shard indexes, or chunk keys)."""
    from tdump._chunks import chunk_prefix
    from tdump._shards import record_sizes, shard_records

    if shard_records(arr) is not None:
        return sorted(record_sizes(arr, keep))
    prefix, sep = chunk_prefix(arr)
    held: set[int] = set()
    for key in _keys(arr.store, arr.path):
        if key.startswith(prefix) and not key.endswith(".partial"):
            head = key[len(prefix) :].split(sep, 1)[0]
            if head.isdigit() and int(head) < keep:
                held.add(int(head))
    return sorted(held)
