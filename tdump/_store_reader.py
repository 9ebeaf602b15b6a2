"""The store's reader, :class:`StoreReader` (the layout is in :mod:`tdump._format`).

Every reader of a dump (xarray backend, :class:`~tdump.analyze.Trial`, rankers,
``tdump ls``) reads through it; it imports neither torch nor the writer.

>>> from tdump._format import StoreWriter
>>> import numpy as np
>>> w = StoreWriter.create("memory://doc/reader.zarr")
>>> w.write_tensor("eval", 0, "x", np.arange(3.0), dims=("i",)); w.commit("eval", 0, step=7)
>>> r = StoreReader("memory://doc/reader.zarr")
>>> r.modes(), r.steps("eval").tolist(), r.read("eval", "x", 0).tolist()
(['eval'], [7], [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import zarr
import zarr.errors

from tdump._chunks import chunk_prefix
from tdump._names import (
    MODES,
    attr_dict,
    check_format,
    committed_count,
    decode_name,
    encode_name,
    rank_group,
)
from tdump._protocols import require_protocol
from tdump._shards import all_fill, record_sizes, record_sizes_many, shard_records
from tdump._validate import (
    DAMAGE,
    META_TYPES,
    call_ok,
    check_steps,
    check_tensor_array,
    damaged,
    damaged_chunk,
)
from tdump._validate import sizes as store_sizes
from tdump._zarrloop import start_zarr_loop
from tdump.errors import (
    CorruptStoreError,
    DumpNotFoundError,
    MissingTensorError,
    NotADumpError,
    first_line,
)

__all__ = ["StoreReader"]

_T = TypeVar("_T")


class StoreReader:
    """Read a dump without the writer's process. Safe while a writer is still appending.

    Every read is validated against ``docs/FORMAT.md`` ("Validation by readers"): a
    damaged node (unparsable metadata, wrong types, an undecodable chunk, step numbers
    that are not non-negative and increasing) raises :class:`NotADumpError` with one
    line naming the part, never a traceback from zarr or a wrong value; a shard file
    missing where the store says records are raises :class:`CorruptStoreError`
    naming the file.

    Parameters
    ----------
    path
        Local path or fsspec URL (``file://``, ``memory://``, ``s3://`` ...).
    storage_options
        Passed to fsspec for URLs.
    snapshot
        Open each node, and count each mode's committed records, once and keep them:
        one consistent view, for an analysis that selects its records up front
        (``rank`` opens each array once instead of three times). By default every call
        looks again, so a reader sees a live dump grow.
    """

    def __init__(
        self,
        path: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        snapshot: bool = False,
    ) -> None:
        self._memo: dict[tuple[Any, ...], Any] | None = {} if snapshot else None
        self.path = str(path)
        # Dask workers may run in another working directory: hand them absolute paths.
        self.location = self.path if "://" in self.path else os.path.abspath(self.path)
        self._root = _open_existing(self.location, storage_options, shown=self.path)
        #: The store format version the dump was written in (1 or 2; docs/FORMAT.md).
        self.format_version = check_format(self.path, self._root.attrs.get("tdump"))

    @property
    def root(self) -> zarr.Group:
        """The root Zarr group (read-only)."""
        return self._root

    def _children(self, key: str) -> list[str]:
        """Nodes directly below ``key``: listed, not opened (one damaged node spoils nothing).

        A folder without ``zarr.json`` (a writer killed while creating it) is no node.
        """
        prefix = f"{key}/" if key else ""
        store = self._root.store
        try:
            names = zarr.core.sync.sync(_collect(store.list_dir(prefix)))
        except FileNotFoundError:
            return []
        names = [n for n in names if n != "zarr.json" and not n.endswith(".partial")]
        found = zarr.core.sync.sync(_exist(store, [f"{prefix}{n}/zarr.json" for n in names]))
        return [n for n, ok in zip(names, found, strict=True) if ok]

    def ranks(self) -> list[int]:
        """Ranks that wrote into this dump, ascending."""
        found = [int(k[4:]) for k in self._children("") if re.fullmatch(r"rank\d+", k)]
        return sorted(found)

    def meta(self, rank: int = 0) -> dict[str, Any]:
        """The rank's ``tdump`` attributes: config, modules, calls, writer, created."""
        info = attr_dict(self._rank(rank).attrs.get("tdump"))
        group = rank_group(rank)
        for key, types in META_TYPES.items():
            value = info.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                kind = "a mapping" if types == (Mapping,) else f"a {types[0].__name__}"
                raise damaged(
                    self.path,
                    f"attribute {key!r} of {group} is a {type(value).__name__}, not {kind}",
                )
        for path, mod in (info.get("modules") or {}).items():
            if not isinstance(mod, Mapping) or not isinstance(mod.get("type", ""), str):
                raise damaged(
                    self.path, f"attribute 'modules' of {group}: entry {path!r} is malformed"
                )
        for mode, calls in (info.get("calls") or {}).items():
            if not isinstance(calls, list) or not all(call_ok(c) for c in calls):
                raise damaged(
                    self.path, f"attribute 'calls' of {group}: mode {mode!r} is malformed"
                )
        for mode, names in (info.get("model_outputs") or {}).items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise damaged(
                    self.path, f"attribute 'model_outputs' of {group}: mode {mode!r} is malformed"
                )
        return info

    def modes(self, rank: int = 0) -> list[str]:
        """Modes with at least one committed record, in :data:`MODES` order."""
        self._rank(rank)
        present = set(self._children(rank_group(rank)))
        return [m for m in MODES if m in present and self.num_records(m, rank) > 0]

    def _remember(self, key: tuple[Any, ...], make: Callable[[], _T]) -> _T:
        """``make()``, kept under ``key`` when this is a snapshot reader."""
        if self._memo is None:
            return make()
        if key not in self._memo:
            self._memo[key] = make()
        return cast(_T, self._memo[key])

    def _records_array(self, mode: str, key: str, rank: int) -> zarr.Array | None:
        node = f"{rank_group(rank)}/{mode}/records/{key}"
        try:
            arr = self._remember(("node", node), lambda: self._root[node])
        except KeyError:
            return None
        except DAMAGE as exc:
            raise damaged(self.path, f"{node}/zarr.json cannot be read", exc) from None
        want = {"step": "int64", "batch_size": "int32", "time": "float64"}[key]
        if not isinstance(arr, zarr.Array) or arr.ndim != 1 or str(arr.dtype) != want:
            raise damaged(self.path, f"{node} is not a 1-d {want} array")
        return arr

    def num_records(self, mode: str, rank: int = 0) -> int:
        """Number of committed records of ``mode`` (0 if the mode was never written)."""
        return self._remember(("committed", mode, rank), lambda: self._count(mode, rank))

    def _count(self, mode: str, rank: int) -> int:
        self._rank(rank)
        step = self._records_array(mode, "step", rank)
        if step is None:
            return 0
        try:
            return committed_count(step)
        except DAMAGE as exc:
            raise damaged(self.path, f"{step.path} cannot be decoded", exc) from None

    def records(self, mode: str, rank: int = 0) -> dict[str, np.ndarray]:
        """Committed records of ``mode`` as arrays ``step``, ``batch_size``, ``time``.

        Raises :class:`NotADumpError` when the committed steps are not non-negative
        and increasing, or a records array is shorter than the committed count.
        """
        n = self.num_records(mode, rank)
        if n == 0:
            return {
                k: np.empty(0, dt)
                for k, dt in (("step", "i8"), ("batch_size", "i4"), ("time", "f8"))
            }
        out: dict[str, np.ndarray] = {}
        for key in ("step", "batch_size", "time"):
            arr = self._records_array(mode, key, rank)
            if arr is None or arr.shape[0] < n:
                raise damaged(
                    self.path, f"{rank_group(rank)}/{mode}/records/{key} has fewer than {n} rows"
                )
            try:
                out[key] = np.asarray(arr[:n])
            except DAMAGE as exc:
                raise damaged(self.path, f"{arr.path} cannot be decoded", exc) from None
        check_steps(self.path, out["step"], f"{rank_group(rank)}/{mode}/records/step")
        return out

    def steps(self, mode: str, rank: int = 0) -> np.ndarray:
        """Step numbers of the committed records of ``mode``."""
        return self.records(mode, rank)["step"]

    def tensor_names(self, mode: str, rank: int = 0) -> list[str]:
        """Names of the tensors stored for ``mode``, sorted (listed; opened by :meth:`array`)."""
        self._rank(rank)
        return sorted(decode_name(k) for k in self._children(f"{rank_group(rank)}/{mode}/tensors"))

    def array(self, mode: str, name: str, rank: int = 0) -> zarr.Array:
        """The raw Zarr array of tensor ``name``, validated. Only rows below ``num_records`` are data."""
        return self._remember(("array", mode, name, rank), lambda: self._array(mode, name, rank))

    def arrays(self, mode: str, names: Sequence[str], rank: int = 0) -> dict[str, zarr.Array]:
        """:meth:`array` of each of ``names``, their metadata read concurrently.

        One round trip to the store instead of one per tensor: opening a detector's
        ~600 tensors one by one took seconds. Errors are :meth:`array`'s.
        """
        todo = [
            n for n in names if self._memo is None or ("array", mode, n, rank) not in self._memo
        ]
        nodes = [f"{rank_group(rank)}/{mode}/tensors/{encode_name(n)}" for n in todo]
        opened = zarr.core.sync.sync(_open_nodes(self._root, nodes)) if todo else []
        # a node that failed to open is opened again by _array, which says why
        found = {
            n: None if isinstance(node, BaseException) else node
            for n, node in zip(todo, opened, strict=True)
        }

        def one(name: str) -> zarr.Array:
            return self._remember(
                ("array", mode, name, rank), lambda: self._array(mode, name, rank, found.get(name))
            )

        return {n: one(n) for n in names}

    def _array(
        self, mode: str, name: str, rank: int, opened: zarr.Array | zarr.Group | None = None
    ) -> zarr.Array:
        node = f"{rank_group(rank)}/{mode}/tensors/{name}"
        try:
            # from the root: the rank group's own metadata (the module tree) is not reread
            key = f"{rank_group(rank)}/{mode}/tensors/{encode_name(name)}"
            arr = opened if opened is not None else self._root[key]
        except KeyError:
            self._rank(rank)  # a rank that is not there: said as such
            raise MissingTensorError(
                f"no tensor {name!r} in mode {mode!r} of {self.path}; `tdump ls {self.path}` lists what is there"
            ) from None
        except DAMAGE as exc:
            raise damaged(self.path, f"{node}/zarr.json cannot be read", exc) from None
        if not isinstance(arr, zarr.Array):
            raise damaged(self.path, f"{node} is a group, not a tensor array")
        check_tensor_array(self.path, node, arr)
        return arr

    def read(self, mode: str, name: str, index: int, rank: int = 0) -> np.ndarray:
        """Row ``index`` (one record) of tensor ``name`` as numpy, decoded through zarr.

        A chunk that does not decode raises :class:`NotADumpError` naming it; a record
        that reads as the fill value in a format-2 array has its shard files checked
        (a missing one where records are raises :class:`CorruptStoreError`).
        """
        arr = self.array(mode, name, rank)
        try:
            value = np.asarray(arr[index])
        except DAMAGE as exc:
            raise damaged_chunk(self.path, arr, index, exc) from None
        if shard_records(arr) is not None and all_fill(value, arr.fill_value):
            self._shard_sizes(arr, self.num_records(mode, rank))  # a missing shard file?
        return value

    def tensor_attrs(self, mode: str, name: str, rank: int = 0) -> dict[str, Any]:
        """The tensor's ``tdump`` attributes (collection, kind, module, call, dims ...)."""
        arr = self.array(mode, name, rank)
        attrs = attr_dict(arr.attrs.get("tdump"))
        attrs["dims"] = list(arr.metadata.dimension_names or ())[1:]  # type: ignore[union-attr]
        return attrs

    def saved_records(
        self, mode: str, name: str, rank: int = 0, *, committed: int | None = None
    ) -> np.ndarray:
        """Indices of committed records at which ``name`` holds data (from the chunk listing).

        ``committed``: the record count the caller read earlier (default: count now).
        Pass it when combining with other reads of a store that is being written, so
        every answer is about the same committed records. A format-2 shard file missing
        where the store says records are raises :class:`CorruptStoreError`.
        """
        n = self.num_records(mode, rank) if committed is None else committed
        arr = self.array(mode, name, rank)
        if shard_records(arr) is not None:
            return np.array(sorted(self._shard_sizes(arr, n)), dtype=np.int64)
        rows = self._chunk_rows(arr)
        return np.array(sorted(r for r in rows if r < n), dtype=np.int64)

    def record_sizes(
        self, mode: str, name: str, rank: int = 0, *, committed: int | None = None
    ) -> dict[int, int]:
        """``{record: stored bytes}`` of the committed records at which ``name`` holds data."""
        n = self.num_records(mode, rank) if committed is None else committed
        arr = self.array(mode, name, rank)
        if shard_records(arr) is not None:
            return self._shard_sizes(arr, n)
        keys = {row: key for row, key in self._chunk_rows(arr).items() if row < n}
        sizes = self.sizes(list(keys.values()))
        return {row: sizes[key] for row, key in keys.items() if key in sizes}

    def record_sizes_many(
        self, mode: str, names: Sequence[str], rank: int = 0, *, committed: int | None = None
    ) -> dict[str, dict[int, int]]:
        """:meth:`record_sizes` of each of ``names``; the shard indexes of all of them are
        read concurrently (one round trip to an object store). Errors are its errors."""
        n = self.num_records(mode, rank) if committed is None else committed
        arrays = self.arrays(mode, names, rank)
        sharded = [name for name in names if shard_records(arrays[name]) is not None]
        out: dict[str, dict[int, int]] = {}
        if sharded:
            try:
                found = record_sizes_many([arrays[x] for x in sharded], n, strict=True)
            except CorruptStoreError:
                raise  # one line naming the shard file, the first in order as one by one
            except DAMAGE:  # one by one, to name the array
                found = [self._shard_sizes(arrays[x], n) for x in sharded]
            out.update(zip(sharded, found, strict=True))
        return {
            x: out[x] if x in out else self.record_sizes(mode, x, rank, committed=n) for x in names
        }

    def _shard_sizes(self, arr: zarr.Array, committed: int) -> dict[int, int]:
        try:
            return record_sizes(arr, committed, strict=True)
        except CorruptStoreError:
            raise  # one line naming the shard file
        except DAMAGE as exc:
            raise damaged(self.path, f"{arr.path}: a shard index cannot be read", exc) from None

    def chunk_keys(self, mode: str, name: str, rank: int = 0) -> dict[int, str]:
        """``{record: store key}`` of the chunk files of tensor ``name`` (``*.partial`` skipped).

        Includes records written but not yet committed; callers keep ``record < n``.
        Format-1 arrays only (a format-2 array's keys are shards: :meth:`record_sizes`).
        """
        return self._chunk_rows(self.array(mode, name, rank))

    def _chunk_rows(self, arr: zarr.Array) -> dict[int, str]:
        prefix, sep = chunk_prefix(arr)
        rows: dict[int, str] = {}
        store = self._root.store
        # list the array's folder: stores list by path segments, and "c." is no segment
        for key in zarr.core.sync.sync(_collect(store.list_prefix(arr.path + "/"))):
            if not key.startswith(prefix) or key.endswith(".partial"):
                continue
            head = key[len(prefix) :].split(sep, 1)[0]
            if head.isdigit():
                rows[int(head)] = key
        return rows

    def sizes(self, keys: Sequence[str]) -> dict[str, int]:
        """Bytes of each store key; keys that vanished meanwhile (a writer's rename) are left out."""
        return dict(zarr.core.sync.sync(store_sizes(self._root.store, list(keys))))

    def all_keys(self, prefix: str = "") -> list[str]:
        """Every key below ``prefix`` except a writer's ``*.partial`` files."""
        keys = zarr.core.sync.sync(_collect(self._root.store.list_prefix(prefix)))
        return [k for k in keys if not k.endswith(".partial")]

    def _rank(self, rank: int) -> zarr.Group:
        try:
            grp = self._remember(("node", rank_group(rank)), lambda: self._root[rank_group(rank)])
        except KeyError:
            raise MissingTensorError(
                f"{self.path} has no data for rank {rank}; ranks present: {self.ranks() or 'none'}"
            ) from None
        except DAMAGE as exc:
            raise damaged(self.path, f"{rank_group(rank)}/zarr.json cannot be read", exc) from None
        if not isinstance(grp, zarr.Group):
            raise damaged(self.path, f"{rank_group(rank)} is an array, not a group")
        return grp


async def _open_nodes(root: zarr.Group, nodes: list[str]) -> list[Any]:
    """The arrays (or groups) at ``nodes`` below ``root``, opened concurrently; an
    exception in place of each node that failed to open."""
    import asyncio

    from zarr import AsyncArray

    async def one(node: str) -> Any:
        got = await root._async_group.getitem(node)  # zarr 3 keeps it private; pinned <4
        return zarr.Array(got) if isinstance(got, AsyncArray) else zarr.Group(got)

    return list(await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True))


async def _collect(it: Any) -> list[str]:
    return [k async for k in it]


async def _exist(store: Any, keys: list[str]) -> list[bool]:
    import asyncio

    return list(await asyncio.gather(*(store.exists(k) for k in keys)))


def _open_existing(
    path: str, storage_options: Mapping[str, Any] | None, *, shown: str | None = None
) -> zarr.Group:
    """Open the root group at ``path``; errors name ``shown`` (the path as the user gave it)."""
    where = shown or path
    opts = dict(storage_options or {}) or None
    require_protocol(path)
    start_zarr_loop()
    if "://" not in path:
        if not os.path.exists(path):
            raise DumpNotFoundError(
                f"no dump at {where}; check the path (create one with `tdump record`)"
            )
        if not os.path.exists(os.path.join(path, "zarr.json")):
            raise NotADumpError(
                f"{where} is not a tdump store (no zarr.json); point at a dump made by `tdump record`"
            )
    try:
        root = zarr.open_group(path, mode="r", storage_options=opts)
    except FileNotFoundError as exc:
        raise DumpNotFoundError(
            f"no dump at {where}; check the path (create one with `tdump record`)"
        ) from exc
    except (zarr.errors.ContainsArrayError, ValueError, KeyError, TypeError) as exc:
        raise NotADumpError(
            f"{where} is not a tdump store ({first_line(exc)}); point at a dump made by `tdump record`"
        ) from None
    # fsspec filesystems are shared per process and object stores cache directory
    # listings (s3fs): a reader opened now must see the groups a writer added since.
    fs = getattr(root.store, "fs", None)
    if fs is not None:
        fs.invalidate_cache()
    return root
