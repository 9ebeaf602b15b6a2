"""Records appended to shard files (store format 2): many records per file, any Zarr v3 reader reads them.

Creating a file costs far more than writing into one that exists (0.6-1 ms per file
on the reference machine's ext4, against 35 ms for a whole 138 MB record appended to
open shards), and a saved step of a resnet18 writes ~200 tensors. Format 2 therefore
stores a tensor array with Zarr's ``sharding_indexed`` codec: a shard holds
:data:`SHARD_RECORDS` records of one tensor, each an inner chunk ``(1, *row)``, and its
index (``(offset, nbytes)`` little-endian ``uint64`` pairs, ``2**64 - 1`` for a
record not written) sits at the start of the file, no checksum. The writer appends a
record's encoded bytes at the end of the shard and then writes its 16-byte index
entry in place: a record is referenced only once its bytes are on disk, and bytes
already referenced never move, so readers and a killed writer never see a torn
record (unreferenced bytes a killed writer appended are skipped). Appending after a
kill clears the entries of records that were never committed
(:func:`forget_after`).

Examples
--------
>>> import numpy as np, os, tempfile, zarr
>>> from tdump._arrays import ArrayFactory
>>> grp = zarr.open_group(os.path.join(tempfile.mkdtemp(), "d.zarr"), mode="w")
>>> arr = ArrayFactory(grp).create_sharded(
...     "t", shape=(4, 3), dtype="f4", fill_value=np.nan, compressors=None,
...     dimension_names=["record", "x"], attributes={})
>>> files = shard_files(arr)
>>> files.write(1, np.arange(3, dtype="f4"))
>>> arr[1].tolist(), files.read(1).tolist(), files.read(2).tolist(), record_sizes(arr, 4)
([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [nan, nan, nan], {1: 12})
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
from typing import Any

import numpy as np
import zarr

from tdump._atomic import write_atomic
from tdump._chunks import ChunkFiles, chunk_files, chunk_prefix, numcodecs_codec
from tdump.errors import CorruptStoreError

__all__ = [
    "SHARD_RECORDS",
    "ShardFiles",
    "forget_after",
    "record_sizes",
    "shard_files",
    "shard_records",
]

#: Records per shard file (a 4 KiB index at the start of each shard).
SHARD_RECORDS = 256
_MISSING = 2**64 - 1
_ENTRY = struct.Struct("<QQ")


def shard_records(arr: zarr.Array) -> int | None:
    """Records per shard if ``arr`` is a format-2 tensor array (index first, no checksum)."""
    codecs: Any = getattr(arr.metadata, "codecs", ())
    if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
        return None
    sharding = codecs[0]
    location = getattr(sharding.index_location, "value", sharding.index_location)
    index_codecs = [type(c).__name__ for c in sharding.index_codecs]
    inner = tuple(sharding.chunk_shape)
    outer = tuple(getattr(arr.metadata.chunk_grid, "chunk_shape", ()))
    if location != "start" or index_codecs != ["BytesCodec"] or inner != (1, *outer[1:]):
        return None
    return int(outer[0])


class ShardFiles(ChunkFiles):
    """The shard files of one format-2 array; build with :func:`shard_files`."""

    def __init__(self, arr: zarr.Array, directory: str, codec: Any, dtype: np.dtype, per: int):
        super().__init__(arr, directory, codec, dtype)
        self.per = per  # records per shard
        self._empty_index = b"\xff" * (16 * per)

    def path(self, index: int) -> str:
        """Shard file holding record ``index``."""
        key = self.arr.metadata.encode_chunk_key((index // self.per, *self._zeros))
        return os.path.join(self.directory, key)

    def write(self, index: int, value: np.ndarray) -> None:
        """Append record ``index`` to its shard, then point its index entry at it."""
        encoded = self._encode(value)
        path = self.path(index)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = self._create(path)
        try:
            end = os.fstat(fd).st_size
            view, at = encoded, end
            while view.nbytes:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            os.pwrite(fd, _ENTRY.pack(end, encoded.nbytes), 16 * (index % self.per))
        finally:
            os.close(fd)

    def _create(self, path: str) -> int:
        """A new shard with an all-missing index, created whole (temporary file, rename)."""
        folder = os.path.dirname(path)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        index = self._empty_index
        write_atomic(path, lambda fh: fh.write(index), tmp_prefix=".shard.")
        return os.open(path, os.O_RDWR)

    def _locate(self, fd: int, index: int, step: int | None) -> tuple[int, int] | None:
        """``(offset, nbytes)`` from the shard's index entry; ``None``: not written."""
        raw = os.pread(fd, 16, 16 * (index % self.per))
        if len(raw) != 16:
            raise self._corrupt(index, step, "has no complete index entry (the file is truncated)")
        offset, size = _ENTRY.unpack(raw)
        if offset == size == _MISSING:
            return None
        if offset + size > os.fstat(fd).st_size or offset < 16 * self.per:
            raise self._corrupt(index, step, f"points outside its shard ({offset}+{size})")
        return offset, size

    def _short(self, size: int) -> str:
        return "is shorter than the index says"

    _REMEDY = "re-record it, or restore a copy of that file"

    def _where(self, index: int, what: str) -> str:
        return f"in shard file {self.path(index)} it {what}"


def shard_files(arr: zarr.Array) -> ShardFiles | None:
    """A :class:`ShardFiles` for a local format-2 array, else ``None``."""
    per = shard_records(arr)
    if per is None:
        return None
    outer = tuple(getattr(arr.metadata.chunk_grid, "chunk_shape", ()))
    if outer[1:] != tuple(arr.shape[1:]):
        return None  # a record spans several shards (not tdump's layout): zarr reads it
    try:
        from zarr.storage import LocalStore

        if not isinstance(arr.store, LocalStore):
            return None
        sharding: Any = arr.metadata.codecs[0]  # type: ignore[union-attr]
        inner = numcodecs_codec(list(sharding.codecs))
        if inner is None:
            return None
        codec, order = inner
        dtype = np.dtype(arr.dtype).newbyteorder(order)
        return ShardFiles(arr, os.path.join(str(arr.store.root), arr.path), codec, dtype, per)
    except Exception:  # any surprise: let zarr do it
        return None


def record_sizes(arr: zarr.Array, committed: int) -> dict[int, int]:
    """``{record: stored bytes}`` of a format-2 array's records below ``committed`` that hold data.

    Reads each shard's index through the array's store (any store, byte ranges).
    """
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    per = shard_records(arr)
    if per is None:
        raise ValueError(f"{arr.path} does not keep its records in shard files")
    # tdump's shards span whole rows (one column); any other grid is summed over its columns
    outer = tuple(getattr(arr.metadata.chunk_grid, "chunk_shape", ()))
    columns = list(
        itertools.product(
            *(range(-(-n // c)) for n, c in zip(arr.shape[1:], outer[1:], strict=True))
        )
    )
    shards = [(k, col) for k in range((committed + per - 1) // per) for col in columns]
    keys = [f"{arr.path}/{arr.metadata.encode_chunk_key((k, *col))}" for k, col in shards]

    async def indexes() -> list[Any]:
        import asyncio

        want = RangeByteRequest(0, 16 * per)
        proto = default_buffer_prototype()
        return await asyncio.gather(*(arr.store.get(k, proto, byte_range=want) for k in keys))

    out: dict[int, int] = {}
    for (shard, _), key, buf in zip(shards, keys, sync(indexes()), strict=True):
        if buf is None:
            continue  # no record of this shard written yet
        raw = buf.to_bytes()
        if len(raw) != 16 * per:
            raise CorruptStoreError(
                f"shard file {key} has a truncated index ({len(raw)} of {16 * per} "
                "bytes); the dump is damaged: re-record it, or delete that file"
            )
        idx = np.frombuffer(raw, dtype="<u8").reshape(per, 2)
        for j in np.flatnonzero(idx[:, 1] != _MISSING):
            record = shard * per + int(j)
            if record < committed:
                out[record] = out.get(record, 0) + int(idx[j, 1])
    return out


def forget_after(arr: zarr.Array, committed: int) -> None:
    """Forget records ``>= committed`` of a local array (a killed writer's leftovers).

    Format 2: their index entries are cleared. Format 1: their chunk files are deleted.
    """
    files = chunk_files(arr)
    if files is None:
        return
    if not isinstance(files, ShardFiles):
        _, sep = chunk_prefix(arr)
        # "." keys are files c.<record>.0... in the array's folder; "/" keys (an array
        # that grew, tdump._arrays.regrow) are c/<record>/0/... below its folder c/
        folder, prefix = (
            (files.directory, "c.") if sep == "." else (os.path.join(files.directory, "c"), "")
        )
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                head = name[len(prefix) :].split(sep, 1)[0]
                if name.startswith(prefix) and head.isdigit() and int(head) >= committed:
                    path = os.path.join(folder, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
        return
    shard = committed // files.per
    while True:
        path = os.path.join(files.directory, arr.metadata.encode_chunk_key((shard, *files._zeros)))
        if not os.path.exists(path):
            return
        start = committed % files.per if shard == committed // files.per else 0
        with open(path, "r+b", buffering=0) as fh:
            fh.seek(16 * start)
            fh.write(b"\xff" * (16 * (files.per - start)))
        shard += 1
