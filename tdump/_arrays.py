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

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from tdump._atomic import write_atomic

__all__ = ["ArrayFactory"]


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
            "attributes": dict(attributes),
            "dimension_names": list(dimension_names),
        }
        meta = ArrayV3Metadata.from_dict(document)  # type: ignore[arg-type]
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
        from zarr.core.array import AsyncArray
        from zarr.core.array_spec import ArrayConfig
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync
        from zarr.storage import LocalStore, StorePath

        path = f"{self.group.path}/{key}" if self.group.path else key
        document = meta.to_buffer_dict(default_buffer_prototype())["zarr.json"]
        store = self.group.store
        if isinstance(store, LocalStore):
            folder = os.path.join(str(store.root), path)
            os.makedirs(folder, exist_ok=True)
            body = document.to_bytes()
            write_atomic(
                os.path.join(folder, "zarr.json"), lambda fh: fh.write(body), tmp_prefix="."
            )
        else:
            sync(store.set(f"{path}/zarr.json", document))
        if config is None:
            config = ArrayConfig.from_dict({"write_empty_chunks": True})
        return zarr.Array(
            AsyncArray(metadata=meta, store_path=StorePath(store, path), config=config)
        )
