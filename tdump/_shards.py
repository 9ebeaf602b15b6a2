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

A shard file is never removed, and an array's shard 0 is created before its
``zarr.json`` (:func:`tdump._arrays.first_shard`), so readers
(``record_sizes(..., strict=True)``) take a shard file that is missing where the
store says records are for damage, not for records never saved.

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from tdump._atomic import write_atomic
from tdump._chunks import ChunkFiles, chunk_files, chunk_prefix, numcodecs_codec
from tdump.errors import CorruptStoreError

__all__ = [
    "SHARD_RECORDS",
    "ShardFiles",
    "all_fill",
    "forget_after",
    "record_sizes",
    "record_sizes_many",
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


def record_sizes(arr: zarr.Array, committed: int, *, strict: bool = False) -> dict[int, int]:
    """``{record: stored bytes}`` of a format-2 array's records below ``committed`` that hold data.

    Reads each shard's index through the array's store (any store, byte ranges). A
    shard file that does not exist holds no record; with ``strict`` (readers), one
    that the store says must exist raises :class:`~tdump.errors.CorruptStoreError`
    (see :func:`_missing_shard`). The writer (growth) passes ``strict=False``.
    """
    return record_sizes_many([arr], committed, strict=strict)[0]


def record_sizes_many(
    arrs: Sequence[zarr.Array], committed: int, *, strict: bool = False
) -> list[dict[int, int]]:
    """:func:`record_sizes` of each of ``arrs`` (all of one store), their shard indexes
    read concurrently: one round trip to an object store instead of one per array."""
    from zarr.core.sync import sync

    plans = [_index_keys(arr, committed) for arr in arrs]
    bufs = iter(sync(_read_indexes(arrs, plans)))
    return [
        _sizes(arr, per, committed, shards, keys, [next(bufs) for _ in keys], strict)
        for arr, (per, shards, keys) in zip(arrs, plans, strict=True)
    ]


_Plan = tuple[int, list[tuple[int, tuple[int, ...]]], list[str]]


def _index_keys(arr: zarr.Array, committed: int) -> _Plan:
    """Records per shard, the shards (record block, column) and their store keys."""
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
    return per, shards, keys


async def _read_indexes(arrs: Sequence[zarr.Array], plans: Sequence[_Plan]) -> list[Any]:
    import asyncio

    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    return await asyncio.gather(
        *(
            arr.store.get(key, proto, byte_range=RangeByteRequest(0, 16 * per))
            for arr, (per, _, keys) in zip(arrs, plans, strict=True)
            for key in keys
        )
    )


def _sizes(
    arr: zarr.Array,
    per: int,
    committed: int,
    shards: list[tuple[int, tuple[int, ...]]],
    keys: list[str],
    bufs: list[Any],
    strict: bool,
) -> dict[int, int]:
    out: dict[int, int] = {}
    held: dict[int, np.ndarray] = {}  # shard -> which of its records hold data
    for (shard, _), key, buf in zip(shards, keys, bufs, strict=True):
        if buf is None:
            continue  # no record of this shard written (or the file is missing: below)
        raw = buf.to_bytes()
        if len(raw) != 16 * per:
            raise CorruptStoreError(
                f"shard file {_shown(arr, key)} has a truncated index ({len(raw)} of "
                f"{16 * per} bytes); the dump is damaged: re-record it, or restore a copy "
                "of that file"
            )
        idx = np.frombuffer(raw, dtype="<u8").reshape(per, 2)
        written = idx[:, 1] != _MISSING
        held[shard] = held[shard] | written if shard in held else written
        for j in np.flatnonzero(written):
            record = shard * per + int(j)
            if record < committed:
                out[record] = out.get(record, 0) + int(idx[j, 1])
    if strict:
        problem = _missing_shard(arr, per, committed, held)
        if problem is not None:
            raise CorruptStoreError(problem)
    return out


def _missing_shard(
    arr: zarr.Array, per: int, committed: int, held: dict[int, np.ndarray]
) -> str | None:
    """What is wrong when a shard file is missing where the store says records are, else ``None``.

    ``held``: the shard files of the committed records that exist, each with which of
    its records hold data. Missing shards are damage in two cases:

    * none exists: the array's ``zarr.json`` exists, and the writer creates shard 0
      before it (a killed writer leaves shard 0, all records "not written");
    * shard 0 is missing from an array whose attributes say ``"shard0": true`` (its
      writer created shard 0 before ``zarr.json``);
    * shard ``k`` is missing but the tensor holds the records either side of it
      (``k * per - 1`` and ``(k + 1) * per``).

    Any other missing shard is records not saved (a collection saved on its own
    schedule, a tensor that first appears, or stops, at a later record).
    """
    count = -(-committed // per)
    if count == 0:
        return None
    if not held:
        first = _shown(arr, _key(arr, 0))
        files = (
            f"shard file {first} is missing"
            if count == 1
            else f"shard files {first} to {_key(arr, count - 1).rsplit('/', 1)[-1]} are missing"
        )
        return _missing_message(
            arr,
            f"has no shard file for its {committed} committed records ({files}), "
            "though its zarr.json says it was recorded",
        )
    attrs = arr.metadata.attributes.get("tdump")
    if 0 not in held and isinstance(attrs, dict) and attrs.get("shard0") is True:
        return _missing_message(
            arr,
            f"is missing shard file {_shown(arr, _key(arr, 0))} (records 0 to {per - 1}), "
            "which its writer created before its zarr.json",
        )
    for k in range(1, count - 1):
        before, after = held.get(k - 1), held.get(k + 1)
        if k not in held and before is not None and after is not None and before[-1] and after[0]:
            return _missing_message(
                arr,
                f"is missing shard file {_shown(arr, _key(arr, k))} (records {k * per} to "
                f"{(k + 1) * per - 1}), though it holds records {k * per - 1} and "
                f"{(k + 1) * per} either side of it",
            )
    return None


def _missing_message(arr: zarr.Array, what: str) -> str:
    tensor = arr.path.rsplit("/", 1)[-1]
    return (
        f"tensor {tensor!r} {what}; the dump is damaged: restore the file from a copy, "
        f"re-record the run, or delete the folder {_shown(arr, arr.path)} to drop that tensor"
    )


def _key(arr: zarr.Array, shard: int) -> str:
    """Store key of shard ``shard`` (column 0) of ``arr``."""
    zeros = (0,) * (arr.ndim - 1)
    return f"{arr.path}/{arr.metadata.encode_chunk_key((shard, *zeros))}"


def _shown(arr: zarr.Array, key: str) -> str:
    """``key`` as the user finds it: a file path on a local store, else the store key."""
    if type(arr.store).__name__ == "LocalStore":
        return os.path.join(str(getattr(arr.store, "root", "")), key)
    return key


def all_fill(value: np.ndarray, fill: Any) -> bool:
    """Whether every element of ``value`` is ``fill`` (NaN counts as equal to a NaN fill).

    What a record of a missing shard file reads as through zarr: readers then check the
    array's shard files (``record_sizes(..., strict=True)``).

    >>> all_fill(np.full(3, np.nan, "f4"), np.float32("nan")), all_fill(np.zeros(2), 0.0)
    (True, True)
    >>> all_fill(np.array([0.0, 1.0]), 0.0)
    False
    """
    fill = np.asarray(fill)
    flat = np.asarray(value).reshape(-1)
    if fill.dtype.kind in "fc" and bool(np.isnan(fill)):
        # the first element settles almost every real record without a pass over all of it
        return not (flat.size and not np.isnan(flat[0])) and bool(np.isnan(flat).all())
    return not (flat.size and flat[0] != fill) and bool((flat == fill).all())


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
