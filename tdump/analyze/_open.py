"""Open a dump as xarray objects backed by lazy Dask arrays.

:func:`open_dump` returns an :class:`xarray.DataTree`::

    /                      attrs: format_version, writer, created, rank, world_size, modules, config, calls
    /train                 coords step (index), record, time, batch_size, mode; tensors of no module (scalars)
    /train/layer1.0.conv1  weight, weight.grad, ...        (one node per module path, flat)
    /train/layer1.0.relu   output_0, output_0.grad, output_1, ...
    /eval ...

Every tensor has the dims ``("step", *its dims)`` (``batch``, ``channel``, ``y``, ``x``
... as in ``docs/FORMAT.md``); module nodes inherit the mode's coordinates. When two
tensors in one node name a dimension alike but with different sizes, that dimension
becomes ``<dim>_<size>`` in the node (e.g. ``channel_64``). Records at which a tensor
was not saved read as NaN (integer tensors are then cast to float64).

Examples
--------
>>> import numpy as np
>>> from tdump._format import StoreWriter
>>> w = StoreWriter.create("memory://doc/open.zarr")
>>> w.write_tensor("train", 0, "fc.weight", np.ones((2, 3), "f4"), dims=("out_feature", "in_feature"),
...                attrs={"collection": "weights", "kind": "parameter", "module": "fc"})
>>> w.commit("train", 0, step=100, batch_size=8)
>>> dt = open_dump("memory://doc/open.zarr")
>>> dt["train/fc"]["weight"].dims
('step', 'out_feature', 'in_feature')
>>> float(dt["train/fc"]["weight"].sel(step=100).sum())
6.0
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from tdump._format import FORMAT_NAME, StoreReader
from tdump._names import MODES, dump_path, no_mode_steps
from tdump._shards import all_fill, record_sizes, shard_records
from tdump._validate import DAMAGE
from tdump.analyze._tasks import corrupt_chunk
from tdump.errors import MissingTensorError, check_choice, did_you_mean

__all__ = [
    "STEP_DIM",
    "check_mode_name",
    "did_you_mean",
    "flat_dataset",
    "mode_datasets",
    "open_dump",
    "open_reader",
]

#: Name of the leading dimension of every tensor variable.
STEP_DIM = "step"
_VAR_ATTRS = ("collection", "kind", "module", "call", "source_dtype", "reduction")


def open_reader(
    path: str | os.PathLike[str] | StoreReader,
    storage_options: Mapping[str, Any] | None = None,
) -> StoreReader:
    """Return a :class:`StoreReader` for ``path`` (a path, an fsspec URL, or a reader).

    Raises :class:`~tdump.errors.ConfigError` for anything else (a number, ``None``).
    """
    if isinstance(path, StoreReader):
        return path
    return StoreReader(dump_path(path), storage_options)


def check_mode_name(mode: object) -> str:
    """``mode`` if it names a mode (train, eval, predict, global), else a :class:`ConfigError`.

    A misspelt mode fails the same way in every reader, with the closest name; a real
    mode the dump has no records of is :class:`~tdump.errors.MissingTensorError` instead.
    """
    return check_choice(mode, MODES, "mode")


def resolve_modes(reader: StoreReader, mode: str | None, rank: int) -> list[str]:
    """The modes to read: ``[mode]`` after checking it has records, or all modes present."""
    present = reader.modes(rank)
    if mode is None:
        return present
    check_mode_name(mode)
    if mode not in present:
        raise MissingTensorError(no_mode_steps(reader.path, mode, present))
    return [mode]


class _CheckedArray:
    """A zarr array for :func:`dask.array.from_array` whose undecodable chunks raise one line.

    A read that finds only the fill value in a format-2 array checks, once, that no
    shard file of the ``committed`` records is missing where the store says records
    are (zarr reads a missing file as the fill value): :class:`~tdump.errors.CorruptStoreError`.
    """

    def __init__(self, arr: Any, path: str, committed: int = 0, created: str = "") -> None:
        self.arr = arr
        self.path = path
        self.committed = committed
        self.created = created  # the rank's creation time: a dump written again differs
        self.shape = tuple(arr.shape)
        self.dtype = arr.dtype
        self.ndim = arr.ndim
        self._shards_checked = shard_records(arr) is None  # format 1: a missing chunk is no record

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # dask would pickle the zarr array to hash it (its store path and metadata):
        # 1-2 ms a tensor, seconds over a detector's ~600; records are only appended,
        # so these say which data the rows below ``committed`` hold
        where = (self.path, str(self.arr.store_path), self.created, self.committed)
        return (type(self).__name__, *where, repr(self.arr.metadata))

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            out = np.asarray(self.arr[key])
        except DAMAGE as exc:
            first = key[0] if isinstance(key, tuple) and key else key
            index = first.start if isinstance(first, slice) else first
            raise corrupt_chunk(self.path, self.arr, int(index or 0), exc) from None
        if not self._shards_checked and out.size and all_fill(out, self.arr.fill_value):
            record_sizes(self.arr, self.committed, strict=True)
            self._shards_checked = True
        return out


@dataclass(frozen=True)
class _Var:
    name: str
    node: str
    local: str
    dims: tuple[str, ...]
    data: da.Array
    attrs: dict[str, Any]


def _tensor_var(
    reader: StoreReader,
    mode: str,
    name: str,
    rank: int,
    n: int,
    batch_size: np.ndarray,
    arr: zarr.Array,
    created: str,
) -> _Var:
    meta = arr.attrs.get("tdump")
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    dims = tuple(str(d) for d in (arr.metadata.dimension_names or ())[1:])  # type: ignore[union-attr]
    if len(dims) != arr.ndim - 1:
        dims = tuple(f"dim_{i}" for i in range(arr.ndim - 1))
    checked = _CheckedArray(arr, reader.path, n, created)
    # meta given: dask would otherwise read an empty selection through zarr to find it
    empty = np.empty((0,) * arr.ndim, dtype=arr.dtype)
    data = da.from_array(checked, chunks=arr.chunks, asarray=True, meta=empty)[:n]
    if data.shape[0] < n:  # saved only in early records: rows past its capacity are not data
        pad = da.full((n - data.shape[0], *data.shape[1:]), arr.fill_value, dtype=data.dtype)
        data = da.concatenate([data, pad])
    if data.dtype.kind in "iub":
        # integer fills (0) are indistinguishable from data: mask records not saved, padded rows
        saved = np.zeros(n, bool)
        saved[reader.saved_records(mode, name, rank, committed=n)] = True
        mask = saved.reshape((n,) + (1,) * (data.ndim - 1))
        if dims and dims[0] == "batch":
            rows = np.arange(data.shape[1])[None, :]
            valid = (batch_size[:, None] < 0) | (rows < batch_size[:, None])
            mask = mask & valid.reshape((n, data.shape[1]) + (1,) * (data.ndim - 2))
        data = da.where(mask, data.astype("f8"), np.nan)
    module = meta.get("module")
    module = str(module) if module is not None else ""
    if module and name.startswith(module + "."):
        node, local = module, name[len(module) + 1 :]
    else:
        node, local = "", name
    attrs: dict[str, Any] = {"tensor": name}
    attrs.update({k: meta[k] for k in _VAR_ATTRS if meta.get(k) is not None})
    attrs["dtype_stored"] = str(arr.dtype)
    return _Var(name, node, local, dims, data, attrs)


def _variable(dims: tuple[str, ...], v: _Var) -> xr.Variable:
    # preferred_chunks: xr.open_dataset(..., chunks={}) keeps one record per chunk
    preferred = {d: int(c[0]) for d, c in zip(dims, v.data.chunks, strict=True) if c}
    return xr.Variable(dims, v.data, v.attrs, encoding={"preferred_chunks": preferred})


def _dedupe_dims(variables: list[tuple[str, _Var]]) -> dict[str, tuple[str, ...]]:
    """Dims per variable, ``<dim>_<size>`` where one name has several sizes in the group."""
    sizes: dict[str, set[int]] = {}
    for _, v in variables:
        for d, s in zip(v.dims, v.data.shape[1:], strict=True):
            sizes.setdefault(d, set()).add(int(s))
    out: dict[str, tuple[str, ...]] = {}
    for key, v in variables:
        dims = []
        for d, s in zip(v.dims, v.data.shape[1:], strict=True):
            dims.append(f"{d}_{s}" if len(sizes[d]) > 1 else d)
        # a tensor that names one dim twice (rare) keeps it distinct
        seen: dict[str, int] = {}
        for i, d in enumerate(dims):
            seen[d] = seen.get(d, 0) + 1
            if seen[d] > 1:
                dims[i] = f"{d}_{seen[d] - 1}"
        out[key] = (STEP_DIM, *dims)
    return out


def _mode_coords(rec: Mapping[str, np.ndarray], mode: str) -> dict[str, Any]:
    n = len(rec["step"])
    coords: dict[str, Any] = {
        STEP_DIM: (STEP_DIM, rec["step"].astype("i8")),
        "record": (STEP_DIM, np.arange(n, dtype="i8")),
        "time": (STEP_DIM, pd.to_datetime(rec["time"], unit="s").to_numpy()),
        "batch_size": (STEP_DIM, rec["batch_size"].astype("i8")),
        "mode": mode,
    }
    return coords


def _mode_vars(
    reader: StoreReader, mode: str, rank: int, rec: Mapping[str, np.ndarray], created: Any
) -> list[_Var]:
    """``created``: the rank's creation time (its metadata, read once by the caller)."""
    # one snapshot of the records for coordinates and data: a live writer may commit more
    n = len(rec["step"])
    batch_size = rec["batch_size"].astype("i8")
    arrays = reader.arrays(mode, reader.tensor_names(mode, rank), rank)
    created = str(created or "")
    return [
        _tensor_var(reader, mode, name, rank, n, batch_size, arr, created)
        for name, arr in arrays.items()
    ]


def mode_datasets(
    reader: StoreReader, mode: str, rank: int = 0, *, drop: Iterable[str] = ()
) -> dict[str, xr.Dataset]:
    """One :class:`xarray.Dataset` per node of ``mode``: ``""`` (the mode) then module paths.

    The ``""`` dataset holds the ``step`` index (module nodes inherit it in the tree);
    every dataset carries the other coordinates (``record``, ``time``, ``batch_size``, ``mode``).
    """
    rec = reader.records(mode, rank)
    coords = _mode_coords(rec, mode)
    dropped = set(drop)
    meta = reader.meta(rank)
    by_node: dict[str, list[tuple[str, _Var]]] = {}
    for v in _mode_vars(reader, mode, rank, rec, meta.get("created")):
        if v.name not in dropped:
            by_node.setdefault(v.node, []).append((v.local, v))
    out: dict[str, xr.Dataset] = {"": xr.Dataset(coords=coords, attrs={"mode": mode})}
    # module nodes in the model's order (named_modules), unknown ones after, by name
    order = {path: i for i, path in enumerate(meta.get("modules") or {})}
    for node in sorted(by_node, key=lambda p: (order.get(p, len(order)), p)):
        items = by_node[node]
        dims = _dedupe_dims(items)
        data_vars = {key: _variable(dims[key], v) for key, v in items}
        if node == "":
            out[""] = out[""].assign(data_vars)
        else:
            # non-index coordinates are not inherited by child nodes: repeat them
            extra = {k: c for k, c in coords.items() if k != STEP_DIM}
            out[node] = xr.Dataset(data_vars, coords=extra, attrs={"module": node, "mode": mode})
    return out


def flat_dataset(
    reader: StoreReader, mode: str, rank: int = 0, *, drop: Iterable[str] = ()
) -> xr.Dataset:
    """All tensors of ``mode`` in one Dataset, variables named by full tensor name.

    Dimensions whose name has several sizes across tensors become ``<dim>_<size>``.
    """
    rec = reader.records(mode, rank)
    coords = _mode_coords(rec, mode)
    dropped = set(drop)
    attrs = {**root_attrs(reader, rank), "mode": mode}
    found = _mode_vars(reader, mode, rank, rec, attrs.get("created"))
    items = [(v.name, v) for v in found if v.name not in dropped]
    dims = _dedupe_dims(items)
    data_vars = {key: _variable(dims[key], v) for key, v in items}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def root_attrs(reader: StoreReader, rank: int = 0) -> dict[str, Any]:
    """Attributes describing the dump and the writing rank (module tree included)."""
    meta = reader.meta(rank)
    attrs: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": reader.format_version,
        "path": reader.path,
        "rank": rank,
    }
    for key in ("world_size", "writer", "created", "config", "modules", "calls", "model_outputs"):
        if key in meta:
            attrs[key] = meta[key]
    return attrs


def open_dump(
    path: str | os.PathLike[str],
    *,
    mode: str | None = None,
    rank: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    drop_variables: Iterable[str] = (),
) -> xr.DataTree:
    """Open a dump as a :class:`xarray.DataTree` of lazy Dask arrays.

    Parameters
    ----------
    path
        The dump: a local path or an fsspec URL (``file://``, ``memory://``, ``s3://`` ...).
    mode
        Only this mode (``train``, ``eval``, ``predict``, ``global``); the returned tree
        is then that mode's node (module nodes as its children).
    rank
        Which writing process's part to read (DDP rank).
    storage_options
        Passed to fsspec for URLs.
    drop_variables
        Full tensor names not to include.

    Returns
    -------
    xarray.DataTree
        ``tree[mode][module][local name]``, e.g. ``tree["train/layer1.0.relu"]["output_0"]``;
        ``tree.tdump.tensor("layer1.0.relu.output_0")`` finds a tensor by its full name.
        Only the records committed when opening are included.

    Raises
    ------
    ConfigError
        ``path`` is not a path or URL, or ``mode`` names no mode (``"evl"``).
    DumpNotFoundError, NotADumpError, FormatVersionError
        Missing path, not a dump, a newer format.
    MissingTensorError
        ``mode`` has no records, or ``rank`` wrote nothing.
    CorruptStoreError
        When values are computed: a chunk does not decode, or a shard file is missing
        where the store says records are (a ``NotADumpError`` too; integer tensors:
        when opening).

    Examples
    --------
    >>> import tdump
    >>> dt = tdump.open_dump("memory://doc/open.zarr")  # written in the module example
    >>> list(dt.children), list(dt["train"].children)
    (['train'], ['fc'])
    >>> dt["train"].coords["step"].values.tolist()
    [100]
    """
    reader = open_reader(path, storage_options)
    modes = resolve_modes(reader, mode, rank)
    if isinstance(drop_variables, str):  # one name, not its characters
        drop_variables = (drop_variables,)
    attrs = root_attrs(reader, rank)
    nodes: dict[str, xr.Dataset] = {}
    if mode is None:
        nodes["/"] = xr.Dataset(attrs=attrs)
    for m in modes:
        base = "" if mode is not None else m
        for node, ds in mode_datasets(reader, m, rank, drop=drop_variables).items():
            key = "/".join(p for p in (base, node) if p)
            nodes["/" + key] = ds
    if mode is not None:
        nodes["/"].attrs.update(attrs)
    return xr.DataTree.from_dict(nodes)


# The ``.tdump`` accessors live with the backend; whatever opens a dump through this
# module (``tdump.open_dump``, ``Trial``) gets them without importing the backend itself.
# Imported last: the backend module imports this one.
import tdump.analyze._xarray  # noqa: E402, F401
