"""The tdump store contract: layout, names, and the low-level writer and reader.

This module is the single place that knows how a dump is laid out in Zarr (see
``docs/FORMAT.md``). The capture hook writes through :class:`StoreWriter` (here);
every reader (xarray backend, :class:`~tdump.analyze.Trial`, rankers, ``tdump ls``)
reads through :class:`StoreReader` (``tdump._store_reader``); names and constants
live in ``tdump._names``. All are re-exported here; none imports torch.

Layout (format version 1)::

    <root>/zarr.json                    group, attrs {"tdump": {"format": "tdump.store", "format_version": 1}}
    <root>/rank<R>/zarr.json            group, attrs {"tdump": {rank, world_size, created, writer, config, modules, calls}}
    <root>/rank<R>/<mode>/records/step        int64  (capacity,) chunks (RECORD_CHUNK,), fill -1   <- commit marker
    <root>/rank<R>/<mode>/records/batch_size  int32  (capacity,) fill -1
    <root>/rank<R>/<mode>/records/time        float64 (capacity,) fill NaN
    <root>/rank<R>/<mode>/tensors/<name>      (capacity, *shape) chunks (1, *shape), dimension_names ("record", ...)

A record is one saved step of one mode. Row ``i`` of every tensor array of a mode
belongs to record ``i``; a record is committed once ``records/step[i] != -1``, which
is written last, after all of its tensors. Rows at or past the committed count, and
rows never written (a tensor not saved at that record), are not data.

Examples
--------
>>> import numpy as np
>>> w = StoreWriter.create("memory://doc/example.zarr")
>>> w.write_tensor("train", 0, "fc.weight", np.ones((2, 3), "f4"), dims=("out_feature", "in_feature"),
...                attrs={"collection": "weights", "kind": "parameter", "module": "fc"})
>>> w.commit("train", 0, step=0, batch_size=8)
>>> r = StoreReader("memory://doc/example.zarr")
>>> r.modes(), r.steps("train").tolist(), r.array("train", "fc.weight")[0].sum()
(['train'], [0], np.float32(6.0))
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import zarr
import zarr.errors

from tdump._arrays import ArrayFactory, drop_stale_chunks, regrow
from tdump._chunks import CHUNK_KEY_ENCODING, ChunkFiles, chunk_files
from tdump._names import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODES,
    RECORD_CHUNK,
    attr_dict,
    check_format,
    check_mode,
    committed_count,
    decode_name,
    encode_name,
    grad_name,
    input_name,
    output_name,
    rank_group,
    scalar_name,
    validate_name,
)
from tdump._protocols import require_protocol
from tdump._shards import forget_after
from tdump._store_reader import StoreReader
from tdump._version import __version__
from tdump._zarrloop import start_zarr_loop
from tdump.errors import ConfigError, NotADumpError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODES",
    "RECORD_CHUNK",
    "StoreReader",
    "StoreWriter",
    "decode_name",
    "encode_name",
    "grad_name",
    "input_name",
    "output_name",
    "scalar_name",
    "validate_name",
]

#: Rows a new tensor array starts with (grown geometrically by :func:`_ensure_rows`).
_INITIAL_CAPACITY = 64


# --------------------------------------------------------------------------- writer
class StoreWriter:
    """Append records to one rank's part of a dump. Not thread-safe: use from one thread.

    Parameters
    ----------
    group
        The opened root group.
    rank
        This process's rank; each rank writes only below ``rank<R>/``.
    """

    def __init__(self, group: zarr.Group, rank: int = 0) -> None:
        self._root = group
        self.rank = rank
        self._rank = group.require_group(rank_group(rank))
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._files: dict[tuple[str, str], ChunkFiles | None] = {}
        self._records: dict[str, dict[str, zarr.Array]] = {}
        self._counts: dict[str, int] = {}
        self._factories: dict[str, ArrayFactory] = {}  # per mode: its tensors group
        #: New tensor arrays keep their records in shard files (format 2, local stores).
        self.sharded = False

    @classmethod
    def create(
        cls,
        path: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        config: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        mode: str = "append",
    ) -> StoreWriter:
        """Open ``path`` for writing ``rank``'s records, creating the store if needed.

        ``mode="append"``: records follow those of the rank already committed (tensor
        arrays are reopened; ``*.partial`` files a killed writer left are removed).
        ``mode="create"``: a rank that already has committed records is refused
        (:class:`~tdump.errors.ConfigError`). An existing directory that is not a dump
        is refused either way.
        """
        if mode not in ("append", "create"):
            raise ConfigError(f"unknown StoreWriter mode {mode!r}; use append or create")
        require_protocol(path)
        start_zarr_loop()
        header: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        try:
            root = zarr.open_group(
                path,
                mode="a",
                zarr_format=3,
                storage_options=dict(storage_options or {}) or None,
                # a new root is written with its attributes at once: a reader never sees
                # a root group without them (it would take it for a foreign Zarr group)
                attributes={"tdump": header},
            )
        except (zarr.errors.ContainsArrayError, ValueError, TypeError) as exc:
            raise NotADumpError(
                f"{path} exists but is not a tdump store ({exc}); choose another --out path"
            ) from exc
        meta = root.attrs.get("tdump")
        if meta is None:
            # DDP ranks create the root together: one rank's (re)creation of the root
            # document can drop the attributes another wrote. Rank groups alone mean tdump.
            if any(not re.fullmatch(r"rank\d+", key) for key in root):
                raise NotADumpError(
                    f"{path} is a Zarr group that tdump did not write; choose another --out path"
                )
            root.attrs["tdump"] = header
            version = FORMAT_VERSION
        else:
            version = check_format(path, meta)
        existed = rank_group(rank) in root
        writer = cls(root, rank)
        # format 1 stores stay format 1 (older readers keep reading them); object
        # stores write whole keys, so appending to a shard would rewrite it each record
        writer.sharded = version >= 2 and type(root.store).__name__ == "LocalStore"
        if existed:
            held = {m: writer.next_record(m) for m in MODES if m in writer._rank}
            if mode == "create" and any(held.values()):
                raise ConfigError(
                    f"{path} already holds records of rank {rank}; append to it or choose "
                    "another --out path"
                )
            writer._remove_partials()
            writer._forget_uncommitted(held)
        info = attr_dict(writer._rank.attrs.get("tdump"))
        info.update(
            rank=rank,
            world_size=world_size,
            writer=f"tdump {__version__}",
            created=info.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(),
        )
        if config is not None:
            info["config"] = dict(config)
        writer._rank.attrs["tdump"] = info
        return writer

    def _remove_partials(self) -> None:
        """Delete ``*.partial`` files a killed writer left below this rank (local stores)."""
        store = self._root.store
        root = getattr(store, "root", None)
        if root is None or type(store).__name__ != "LocalStore":
            return  # object stores write whole keys: nothing is left half-written
        base = os.path.join(str(root), self._rank.path)
        for folder, _, files in os.walk(base):
            for name in files:
                if name.endswith(".partial"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))

    def _forget_uncommitted(self, held: Mapping[str, int]) -> None:
        """Drop what a killed writer wrote for records it never committed (local stores)."""
        if type(self._root.store).__name__ != "LocalStore":
            return  # object stores: whole keys, and readers keep ``record < committed``
        for mode, committed in held.items():
            tensors = self._rank.get(f"{mode}/tensors")
            if isinstance(tensors, zarr.Group):
                for _, arr in tensors.arrays():
                    drop_stale_chunks(arr)  # what a growth (regrow) left of the old array
                    forget_after(arr, committed)

    # -- metadata
    def update_meta(self, **fields: Any) -> None:
        """Merge JSON-serialisable ``fields`` (e.g. ``modules=``, ``calls=``) into the rank's attrs."""
        info = attr_dict(self._rank.attrs.get("tdump"))
        info.update(fields)
        self._rank.attrs["tdump"] = info

    # -- records
    def _record_arrays(self, mode: str) -> dict[str, zarr.Array]:
        if mode in self._records:
            return self._records[mode]
        grp = self._rank.require_group(f"{check_mode(mode)}/records")
        spec = {"step": ("int64", -1), "batch_size": ("int32", -1), "time": ("float64", np.nan)}
        arrays: dict[str, zarr.Array] = {}
        for key, (dtype, fill) in spec.items():
            if key in grp:
                arrays[key] = grp[key]  # type: ignore[assignment]
            else:
                arrays[key] = grp.create_array(
                    key,
                    shape=(RECORD_CHUNK,),
                    chunks=(RECORD_CHUNK,),
                    dtype=dtype,
                    fill_value=fill,
                    compressors=None,
                    dimension_names=["record"],
                )
        self._records[mode] = arrays
        self._counts[mode] = committed_count(arrays["step"])
        return arrays

    def next_record(self, mode: str) -> int:
        """Index the next record of ``mode`` will get (the number committed so far)."""
        self._record_arrays(mode)
        return self._counts[mode]

    def commit(
        self,
        mode: str,
        record: int,
        *,
        step: int,
        batch_size: int = -1,
        wall_time: float | None = None,
    ) -> None:
        """Make record ``record`` visible to readers. Call after all its tensors are written."""
        arrays = self._record_arrays(mode)
        if record != self._counts[mode]:
            raise ValueError(
                f"records must be committed in order: expected {self._counts[mode]}, got {record}"
            )
        for arr in arrays.values():
            _ensure_rows(arr, record + 1)
        arrays["batch_size"][record] = batch_size
        arrays["time"][record] = time.time() if wall_time is None else wall_time
        arrays["step"][record] = step  # written last: the commit marker
        self._counts[mode] = record + 1

    # -- tensors
    def write_tensor(
        self,
        mode: str,
        record: int,
        name: str,
        value: np.ndarray,
        *,
        dims: Sequence[str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        compressors: Any = "auto",
        dtype: Any = None,
        executor: Executor | None = None,
    ) -> Future[None] | None:
        """Write ``value`` as row ``record`` of tensor ``name`` in ``mode``.

        The array is created on first use with ``dims`` and ``attrs``; a later value
        larger along any axis (a larger batch) grows the array: its earlier records are
        copied into rows of the new shape (:func:`tdump._arrays.regrow`), a cost of one
        pass over them. A smaller value is padded with the fill value and
        ``records/batch_size`` says how much is data.

        With ``executor``, a local record file is encoded and written there and its
        future returned: wait for it (and leave ``value`` alone) before :meth:`commit`.
        """
        key = (mode, name)
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._create_tensor(mode, name, value, dims, attrs, compressors, dtype)
            self._arrays[key] = arr
        shape = tuple(arr.shape[1:])
        if value.ndim != len(shape):
            raise ValueError(f"{name}: got {value.ndim} dims, store has {len(shape)}")
        if value.shape != shape:
            grown = tuple(max(a, b) for a, b in zip(shape, value.shape, strict=True))
            if grown != shape:
                # a chunk is one whole record and its shape is fixed: resizing alone would
                # write records larger than their chunk, so the array is rebuilt (its
                # earlier records copied, padded) and made live atomically
                arr = self._arrays[key] = regrow(arr, grown, record)
                self._files.pop(key, None)
                shape = grown
            padded = np.full(shape, arr.fill_value, dtype=arr.dtype)
            padded[tuple(slice(0, n) for n in value.shape)] = value
            value = padded
        _ensure_rows(arr, record + 1)
        if key not in self._files:
            self._files[key] = chunk_files(arr)
        files = self._files[key]
        if files is None:
            arr[record] = value
        elif executor is not None:
            return executor.submit(files.write, record, value)
        else:
            files.write(record, value)  # GIL-light: the training thread keeps running
        return None

    def _create_tensor(
        self,
        mode: str,
        name: str,
        value: np.ndarray,
        dims: Sequence[str] | None,
        attrs: Mapping[str, Any] | None,
        compressors: Any,
        dtype: Any,
    ) -> zarr.Array:
        key = encode_name(name)
        factory = self._factories.get(mode)
        if factory is None:
            group = self._rank.require_group(f"{check_mode(mode)}/tensors")
            factory = self._factories[mode] = ArrayFactory(group)
        if key in factory.existing():  # appending to a dump another process wrote
            arr = factory.group[key]
            if not isinstance(arr, zarr.Array) or arr.ndim != value.ndim + 1:
                raise ValueError(
                    f"{name}: the dump holds it with other dimensions; append the same model"
                )
            return arr
        store_dtype = np.dtype(dtype) if dtype is not None else value.dtype
        dims = tuple(dims) if dims is not None else tuple(f"dim_{i}" for i in range(value.ndim))
        if len(dims) != value.ndim:
            raise ValueError(f"{name}: {len(dims)} dims named for a {value.ndim}-d tensor")
        fill = np.nan if store_dtype.kind == "f" else 0
        meta = {"name": name, "source_dtype": str(value.dtype), **dict(attrs or {})}
        if self.sharded:
            return factory.create_sharded(
                key,
                shape=(_INITIAL_CAPACITY, *value.shape),
                dtype=store_dtype,
                fill_value=fill,
                compressors=compressors,
                dimension_names=["record", *dims],
                attributes={"tdump": meta},
            )
        return factory.create(
            key,
            shape=(_INITIAL_CAPACITY, *value.shape),
            chunks=(1, *value.shape),
            dtype=store_dtype,
            fill_value=fill,
            compressors=compressors,
            dimension_names=["record", *dims],
            chunk_key_encoding=CHUNK_KEY_ENCODING,
            attributes={"tdump": meta},
            # a row equal to the fill value (an int scalar 0) must still be written:
            # readers find saved records from the chunk listing (saved_records)
            config={"write_empty_chunks": True},
        )


def _ensure_rows(arr: zarr.Array, rows: int) -> None:
    """Grow axis 0 geometrically so appends cost one metadata write per doubling."""
    if arr.shape[0] >= rows:
        return
    cap = arr.shape[0]
    while cap < rows:
        cap *= 2
    arr.resize((cap, *arr.shape[1:]))
