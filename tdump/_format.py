"""The tdump store contract: layout, names, and the low-level writer and reader.

This module is the single place that knows how a dump is laid out in Zarr (see
``docs/FORMAT.md``). The capture hook writes through :class:`StoreWriter`; every
reader (xarray backend, :class:`~tdump.analyze.Trial`, rankers, ``tdump ls``) reads
through :class:`StoreReader`. Neither imports torch.

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar, cast

import numpy as np
import zarr
import zarr.errors

from tdump._arrays import ArrayFactory
from tdump._chunks import CHUNK_KEY_ENCODING, ChunkFiles, chunk_files, chunk_prefix
from tdump._protocols import require_protocol
from tdump._shards import forget_after, record_sizes, shard_records
from tdump._validate import (
    DAMAGE,
    META_TYPES,
    call_ok,
    check_steps,
    check_tensor_array,
    damaged,
    damaged_chunk,
    first_line,
)
from tdump._validate import sizes as store_sizes
from tdump._version import __version__
from tdump.errors import (
    ConfigError,
    DumpNotFoundError,
    FormatVersionError,
    MissingTensorError,
    NotADumpError,
)

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

FORMAT_NAME = "tdump.store"
FORMAT_VERSION = 2
#: Store format versions this tdump reads (docs/FORMAT.md: 2 adds shard files).
READ_VERSIONS = (1, 2)
#: Modes in the order readers list them. A mode has its own step counter.
MODES: tuple[str, ...] = ("train", "eval", "predict", "global")
#: Rows per chunk of the small ``records/*`` arrays (each commit rewrites one chunk atomically).
RECORD_CHUNK = 1024
_INITIAL_CAPACITY = 64
_T = TypeVar("_T")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")


# --------------------------------------------------------------------------- names
def output_name(module: str, call: int) -> str:
    """Name of the output of call ``call`` (0-based, per forward) of ``module``.

    >>> output_name("layer1.0.relu", 1)
    'layer1.0.relu.output_1'
    """
    return f"{module}.output_{call}"


def input_name(module: str, call: int, arg: int) -> str:
    """Name of positional input ``arg`` of call ``call`` of ``module`` (loss inputs).

    >>> input_name("loss", 0, 1)
    'loss.input_0.1'
    """
    return f"{module}.input_{call}.{arg}"


def grad_name(name: str) -> str:
    """Name of the gradient of the loss w.r.t. the tensor called ``name``.

    >>> grad_name("layer1.0.conv1.weight")
    'layer1.0.conv1.weight.grad'
    """
    return f"{name}.grad"


def scalar_name(name: str) -> str:
    """Name under which ``hook.save_scalar(name, value)`` is stored.

    >>> scalar_name("lr")
    'scalars.lr'
    """
    return f"scalars.{validate_name(name)}"


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a tensor (any non-empty string), else raise :class:`ConfigError`.

    Names are stored under :func:`encode_name` keys, so any legal PyTorch module name works.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"tensor name {name!r} is empty; name the tensor")
    return name


def encode_name(name: str) -> str:
    """The store key of tensor ``name``: reversible, one path segment, inside the store.

    Characters other than ASCII letters, digits, ``_``, ``-`` and ``.`` (and ``%``
    itself) become ``%XX`` per UTF-8 byte, as do a leading ``-`` or ``.``, a ``.``
    after a ``.`` and a trailing ``.``; so no key holds ``/``, ``..`` or a hidden
    name, and names made of safe characters are their own keys (docs/FORMAT.md,
    "Tensor names").

    >>> encode_name("blocks.a/b.weight"), encode_name("hé.x y"), encode_name("..")
    ('blocks.a%2Fb.weight', 'h%C3%A9.x%20y', '%2E%2E')
    >>> decode_name(encode_name("blocks.a/b..c")) == "blocks.a/b..c"
    True
    """
    validate_name(name)
    if name == "zarr.json":
        return "zarr%2Ejson"  # the group's own metadata document
    out: list[str] = []
    last = len(name) - 1
    for i, ch in enumerate(name):
        unsafe = (
            ch not in _SAFE
            or (i == 0 and ch in "-.")
            or (ch == "." and (i == last or name[i - 1] == "."))
        )
        out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")) if unsafe else ch)
    return "".join(out)


def decode_name(key: str) -> str:
    """The tensor name stored under ``key`` (inverse of :func:`encode_name`)."""
    if "%" not in key:
        return key
    from urllib.parse import unquote

    return unquote(key, errors="strict")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _rank_group(rank: int) -> str:
    return f"rank{rank}"


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
        self._rank = group.require_group(_rank_group(rank))
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
            version = _check_format(path, meta)
        existed = _rank_group(rank) in root
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
        info = _attr_dict(writer._rank.attrs.get("tdump"))
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
                    forget_after(arr, committed)

    # -- metadata
    def update_meta(self, **fields: Any) -> None:
        """Merge JSON-serialisable ``fields`` (e.g. ``modules=``, ``calls=``) into the rank's attrs."""
        info = _attr_dict(self._rank.attrs.get("tdump"))
        info.update(fields)
        self._rank.attrs["tdump"] = info

    # -- records
    def _record_arrays(self, mode: str) -> dict[str, zarr.Array]:
        if mode in self._records:
            return self._records[mode]
        grp = self._rank.require_group(f"{_check_mode(mode)}/records")
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
        self._counts[mode] = _committed_count(arrays["step"])
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
        whose leading (batch) extent is larger grows the array; a smaller one is padded
        with the fill value and ``records/batch_size`` says how much is data.

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
                arr.resize((arr.shape[0], *grown))
                shape = grown
            padded = np.full(shape, arr.fill_value, dtype=arr.dtype)
            padded[tuple(slice(0, n) for n in value.shape)] = value
            value = padded
        _ensure_rows(arr, record + 1)
        files = self._files.get(key)
        if key not in self._files or (files is not None and files.row_shape != shape):
            files = self._files[key] = chunk_files(arr)  # new, or the batch axis grew
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
            group = self._rank.require_group(f"{_check_mode(mode)}/tensors")
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


def _attr_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _ensure_rows(arr: zarr.Array, rows: int) -> None:
    """Grow axis 0 geometrically so appends cost one metadata write per doubling."""
    if arr.shape[0] >= rows:
        return
    cap = arr.shape[0]
    while cap < rows:
        cap *= 2
    arr.resize((cap, *arr.shape[1:]))


def _committed_count(step: zarr.Array) -> int:
    """Length of the leading run of committed rows (``step != -1``)."""
    n = step.shape[0]
    for start in range(0, n, RECORD_CHUNK):
        block = np.asarray(step[start : min(n, start + RECORD_CHUNK)])
        missing = np.flatnonzero(block == -1)
        if missing.size:
            return start + int(missing[0])
    return n


def _check_format(path: str, meta: Any) -> int:
    """The store format version of root attributes ``meta``; refuses what is not a readable dump."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise NotADumpError(
            f"{path} is a Zarr group that tdump did not write; point at a dump made by `tdump record`"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version not in READ_VERSIONS:
        raise FormatVersionError(
            f"{path} has store format version {version}, this tdump reads up to {FORMAT_VERSION}; "
            "upgrade tdump (pip install -U tdump)"
        )
    return version


# --------------------------------------------------------------------------- reader
class StoreReader:
    """Read a dump without the writer's process. Safe while a writer is still appending.

    Every read is validated against ``docs/FORMAT.md`` ("Validation by readers"): a
    damaged node (unparsable metadata, wrong types, an undecodable chunk, step numbers
    that are not non-negative and increasing) raises :class:`NotADumpError` with one
    line naming the part, never a traceback from zarr or a wrong value.

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
        self.format_version = _check_format(self.path, self._root.attrs.get("tdump"))

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
        info = _attr_dict(self._rank(rank).attrs.get("tdump"))
        group = _rank_group(rank)
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
        return info

    def modes(self, rank: int = 0) -> list[str]:
        """Modes with at least one committed record, in :data:`MODES` order."""
        self._rank(rank)
        present = set(self._children(_rank_group(rank)))
        return [m for m in MODES if m in present and self.num_records(m, rank) > 0]

    def _remember(self, key: tuple[Any, ...], make: Callable[[], _T]) -> _T:
        """``make()``, kept under ``key`` when this is a snapshot reader."""
        if self._memo is None:
            return make()
        if key not in self._memo:
            self._memo[key] = make()
        return cast(_T, self._memo[key])

    def _records_array(self, mode: str, key: str, rank: int) -> zarr.Array | None:
        node = f"{_rank_group(rank)}/{mode}/records/{key}"
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
            return _committed_count(step)
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
                    self.path, f"{_rank_group(rank)}/{mode}/records/{key} has fewer than {n} rows"
                )
            try:
                out[key] = np.asarray(arr[:n])
            except DAMAGE as exc:
                raise damaged(self.path, f"{arr.path} cannot be decoded", exc) from None
        check_steps(self.path, out["step"], f"{_rank_group(rank)}/{mode}/records/step")
        return out

    def steps(self, mode: str, rank: int = 0) -> np.ndarray:
        """Step numbers of the committed records of ``mode``."""
        return self.records(mode, rank)["step"]

    def tensor_names(self, mode: str, rank: int = 0) -> list[str]:
        """Names of the tensors stored for ``mode``, sorted (listed; opened by :meth:`array`)."""
        self._rank(rank)
        return sorted(decode_name(k) for k in self._children(f"{_rank_group(rank)}/{mode}/tensors"))

    def array(self, mode: str, name: str, rank: int = 0) -> zarr.Array:
        """The raw Zarr array of tensor ``name``, validated. Only rows below ``num_records`` are data."""
        return self._remember(("array", mode, name, rank), lambda: self._array(mode, name, rank))

    def _array(self, mode: str, name: str, rank: int) -> zarr.Array:
        node = f"{_rank_group(rank)}/{mode}/tensors/{name}"
        try:
            arr = self._rank(rank)[f"{mode}/tensors/{encode_name(name)}"]
        except KeyError:
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

        A chunk that does not decode raises :class:`NotADumpError` naming it.
        """
        arr = self.array(mode, name, rank)
        try:
            return np.asarray(arr[index])
        except DAMAGE as exc:
            raise damaged_chunk(self.path, arr, index, exc) from None

    def tensor_attrs(self, mode: str, name: str, rank: int = 0) -> dict[str, Any]:
        """The tensor's ``tdump`` attributes (collection, kind, module, call, dims ...)."""
        arr = self.array(mode, name, rank)
        attrs = _attr_dict(arr.attrs.get("tdump"))
        attrs["dims"] = list(arr.metadata.dimension_names or ())[1:]  # type: ignore[union-attr]
        return attrs

    def saved_records(
        self, mode: str, name: str, rank: int = 0, *, committed: int | None = None
    ) -> np.ndarray:
        """Indices of committed records at which ``name`` holds data (from the chunk listing).

        ``committed``: the record count the caller read earlier (default: count now).
        Pass it when combining with other reads of a store that is being written, so
        every answer is about the same committed records.
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

    def _shard_sizes(self, arr: zarr.Array, committed: int) -> dict[int, int]:
        try:
            return record_sizes(arr, committed)
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
            grp = self._remember(("node", _rank_group(rank)), lambda: self._root[_rank_group(rank)])
        except KeyError:
            raise MissingTensorError(
                f"{self.path} has no data for rank {rank}; ranks present: {self.ranks() or 'none'}"
            ) from None
        except DAMAGE as exc:
            raise damaged(self.path, f"{_rank_group(rank)}/zarr.json cannot be read", exc) from None
        if not isinstance(grp, zarr.Group):
            raise damaged(self.path, f"{_rank_group(rank)} is an array, not a group")
        return grp


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
