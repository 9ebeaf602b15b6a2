"""xarray integration: the ``engine="tdump"`` backend and the ``.tdump`` accessor.

``xr.open_datatree(path, engine="tdump")`` is :func:`~tdump.analyze.open_dump`;
``xr.open_dataset(path, engine="tdump", mode="train")`` gives every tensor of one mode
in one Dataset (variables named by full tensor name), and ``group="train/layer1.0.relu"``
one node of the tree. The accessor finds tensors by their full name on either kind of
object.

Examples
--------
>>> import numpy as np, xarray as xr
>>> from tdump._format import StoreWriter
>>> w = StoreWriter.create("memory://doc/xr.zarr")
>>> w.write_tensor("train", 0, "fc.bias", np.arange(3, dtype="f4"), dims=("channel",),
...                attrs={"collection": "biases", "kind": "parameter", "module": "fc"})
>>> w.commit("train", 0, step=5, batch_size=4)
>>> ds = xr.open_dataset("memory://doc/xr.zarr", engine="tdump")
>>> ds["fc.bias"].dims, ds.tdump.names()
(('step', 'channel'), ['fc.bias'])
>>> xr.open_datatree("memory://doc/xr.zarr", engine="tdump").tdump.tensor("fc.bias").values.tolist()
[[0.0, 1.0, 2.0]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint

from tdump._format import FORMAT_NAME
from tdump._names import MODES, dump_path, no_mode_steps
from tdump.analyze._open import (
    check_mode_name,
    did_you_mean,
    flat_dataset,
    mode_datasets,
    open_dump,
    open_reader,
    resolve_modes,
)
from tdump.errors import ConfigError, MissingTensorError, compile_regex

__all__ = ["TdumpBackendEntrypoint", "TdumpDatasetAccessor", "TdumpTreeAccessor"]

_PARAMS = ("filename_or_obj", "drop_variables", "mode", "group", "rank", "storage_options")


def _path(filename_or_obj: Any) -> str:
    return dump_path(filename_or_obj, "what engine='tdump' opens")


class TdumpBackendEntrypoint(BackendEntrypoint):
    """xarray backend for tdump stores (``engine="tdump"``).

    Keyword arguments accepted by ``xr.open_dataset`` / ``xr.open_datatree``: ``mode``,
    ``group``, ``rank``, ``storage_options``, ``drop_variables`` (full tensor names).
    """

    description = "Open tdump tensor dumps (Zarr) as lazy Dask-backed xarray objects"
    url = "https://github.com/tdump/tdump/blob/main/docs/reading.md"
    open_dataset_parameters = _PARAMS
    # xr.open_datatree / open_groups without engine= only ask backends that declare
    # groups; without this a local dump fell through to xarray's zarr engine
    supports_groups = True

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        mode: str | None = None,
        group: str | None = None,
        rank: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> xr.Dataset:
        """One Dataset: all tensors of ``mode`` (default: the first mode), or one tree node.

        ``group`` is a node path of :func:`open_dump`'s tree: ``"train"``,
        ``"train/layer1.0.relu"``, or just ``"layer1.0.relu"`` together with ``mode``.
        """
        reader = open_reader(_path(filename_or_obj), storage_options)
        drop = _drop(drop_variables)
        if group is None:
            present = resolve_modes(reader, mode, rank)
            if not present:
                raise MissingTensorError(f"{reader.path} has no committed records yet")
            return flat_dataset(reader, present[0], rank, drop=drop)
        parts = group.strip("/").split("/", 1)
        if mode is None:
            mode = parts[0]
            node = parts[1] if len(parts) > 1 else ""
            if mode not in MODES:
                raise ConfigError(
                    f"group {group!r} does not start with a mode; use group='train/{group.strip('/')}' "
                    f"or pass mode= (one of {', '.join(MODES)}){did_you_mean(mode, MODES)}"
                )
        else:
            node = "" if parts[0] == mode and len(parts) == 1 else group.strip("/")
            if node.startswith(mode + "/"):
                node = node[len(mode) + 1 :]
        resolve_modes(reader, mode, rank)
        nodes = mode_datasets(reader, mode, rank, drop=drop)
        if node not in nodes:
            raise MissingTensorError(
                f"no group {group!r} in mode {mode!r} of {reader.path}{did_you_mean(node, nodes)}"
            )
        ds = nodes[node]
        if node:  # give the node the step index it would inherit in the tree
            ds = ds.assign_coords(step=nodes[""].coords["step"])
        return ds

    def open_datatree(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        mode: str | None = None,
        group: str | None = None,
        rank: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> xr.DataTree:
        """The tree of :func:`open_dump` (``group`` selects a subtree)."""
        tree = open_dump(
            _path(filename_or_obj),
            mode=mode,
            rank=rank,
            storage_options=storage_options,
            drop_variables=_drop(drop_variables),
        )
        if group:
            sub = tree[group.strip("/")]
            if not isinstance(sub, xr.DataTree):
                raise MissingTensorError(f"{group!r} is a variable, not a group")
            tree = xr.DataTree.from_dict(
                {"/" + k.lstrip("/"): n.to_dataset() for k, n in _relative(sub).items()}
            )
        return tree

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        mode: str | None = None,
        group: str | None = None,
        rank: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> dict[str, xr.Dataset]:
        """``{node path: Dataset}`` of the tree (for ``xr.open_groups``)."""
        tree = self.open_datatree(
            filename_or_obj,
            drop_variables=drop_variables,
            mode=mode,
            group=group,
            rank=rank,
            storage_options=storage_options,
        )
        return {node.path: node.to_dataset() for node in tree.subtree}

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """True for a local directory whose ``zarr.json`` says it is a tdump store."""
        try:
            path = _path(filename_or_obj)
        except ConfigError:
            return False
        meta = os.path.join(path, "zarr.json")
        if "://" in path or not os.path.isfile(meta):
            return False
        try:
            with open(meta, encoding="utf-8") as fh:
                attrs = json.load(fh).get("attributes", {})
        except (OSError, ValueError):
            return False
        return isinstance(attrs, dict) and attrs.get("tdump", {}).get("format") == FORMAT_NAME


def _relative(tree: xr.DataTree) -> dict[str, xr.DataTree]:
    base = tree.path.rstrip("/")
    return {node.path[len(base) :] or "/": node for node in tree.subtree}


def _drop(drop_variables: str | Iterable[str] | None) -> tuple[str, ...]:
    if drop_variables is None:
        return ()
    if isinstance(drop_variables, str):
        return (drop_variables,)
    return tuple(drop_variables)


def _match(names: Iterable[str], regex: str | None) -> list[str]:
    pattern = compile_regex(regex)
    if pattern is None:
        return sorted(names)
    return sorted(n for n in names if pattern.search(n))


def _tensor_vars(ds: xr.Dataset) -> dict[str, str]:
    """``{full tensor name: variable name}`` in ``ds``."""
    return {str(v.attrs["tensor"]): str(k) for k, v in ds.data_vars.items() if "tensor" in v.attrs}


@xr.register_dataset_accessor("tdump")
class TdumpDatasetAccessor:
    """``ds.tdump``: tensors of a dump Dataset by full name.

    Examples
    --------
    >>> import xarray as xr
    >>> ds = xr.open_dataset("memory://doc/xr.zarr", engine="tdump")  # see module example
    >>> ds.tdump.tensor("fc.bias").attrs["collection"]
    'biases'
    """

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def names(self, regex: str | None = None) -> list[str]:
        """Full tensor names in this Dataset, sorted; ``regex`` filters with ``re.search``."""
        return _match(_tensor_vars(self._obj), regex)

    def tensor(self, name: str) -> xr.DataArray:
        """The variable holding tensor ``name`` (its full name, e.g. ``layer1.0.relu.output_0``)."""
        if not isinstance(name, str):
            raise ConfigError(f"tensor name must be a str, got {type(name).__name__} {name!r}")
        found = _tensor_vars(self._obj)
        if name not in found:
            raise MissingTensorError(
                f"no tensor {name!r} in this Dataset{did_you_mean(name, found)}"
            )
        return self._obj[found[name]]

    @property
    def modules(self) -> dict[str, Any]:
        """The module tree recorded by the hook (``{path: {type, params, buffers, config}}``)."""
        return dict(self._obj.attrs.get("modules") or {})

    @property
    def collections(self) -> dict[str, list[str]]:
        """``{collection: [tensor names]}`` of this Dataset."""
        return _collections(
            (str(v.attrs["tensor"]), str(v.attrs.get("collection", "")))
            for v in self._obj.data_vars.values()
            if "tensor" in v.attrs
        )


def _collections(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, coll in pairs:
        out.setdefault(coll, []).append(name)
    return {k: sorted(set(v)) for k, v in sorted(out.items())}


def _mode_rank(mode: str) -> int:
    """Position of ``mode`` in :data:`~tdump._names.MODES` (others after them)."""
    return MODES.index(mode) if mode in MODES else len(MODES)


@xr.register_datatree_accessor("tdump")
class TdumpTreeAccessor:
    """``tree.tdump``: tensors, modes and the module tree of an :func:`open_dump` tree.

    Examples
    --------
    >>> import xarray as xr
    >>> dt = xr.open_datatree("memory://doc/xr.zarr", engine="tdump")  # see module example
    >>> dt.tdump.modes, dt.tdump.names("bias")
    (['train'], ['fc.bias'])
    >>> dt.tdump.module("fc")["bias"].dims
    ('step', 'channel')
    """

    def __init__(self, obj: xr.DataTree) -> None:
        self._obj = obj

    def _entries(self) -> list[tuple[str, str, xr.DataTree, str]]:
        """``(mode, tensor name, node, variable)`` for every tensor below this node."""
        out = []
        for node in self._obj.subtree:
            for var, arr in node.dataset.data_vars.items():
                if "tensor" in arr.attrs:
                    mode = str(node.dataset.coords["mode"].item()) if "mode" in node.coords else ""
                    out.append((mode, str(arr.attrs["tensor"]), node, str(var)))
        # mode order as everywhere else (Trial, tdump ls): a backend may list nodes otherwise
        return sorted(out, key=lambda e: _mode_rank(e[0]))

    @property
    def modes(self) -> list[str]:
        """Modes in this tree: train, eval, predict, global (the order of ``Trial.modes()``)."""
        seen: list[str] = []
        for mode, *_ in self._entries():
            if mode not in seen:
                seen.append(mode)
        return seen

    def _check_mode(
        self, mode: str | None, entries: list[tuple[str, str, xr.DataTree, str]]
    ) -> None:
        """A misspelt ``mode`` is a :class:`ConfigError`, one this tree lacks a
        :class:`MissingTensorError`, as in :class:`~tdump.analyze.Trial`: never an empty answer."""
        if mode is None:
            return
        check_mode_name(mode)
        present = [m for m in dict.fromkeys(e[0] for e in entries) if m]
        if present and mode not in present:
            raise MissingTensorError(no_mode_steps("this tree", mode, present))

    def names(self, regex: str | None = None, *, mode: str | None = None) -> list[str]:
        """Full tensor names below this node, sorted; ``regex`` filters with ``re.search``.

        Raises
        ------
        ConfigError
            ``mode`` is not a mode name (``train``, ``eval``, ``predict``, ``global``).
        MissingTensorError
            This tree holds no tensors of ``mode``.
        """
        entries = self._entries()
        self._check_mode(mode, entries)
        return _match({n for m, n, _, _ in entries if mode in (None, m)}, regex)

    def tensor(self, name: str, *, mode: str | None = None) -> xr.DataArray:
        """The DataArray of tensor ``name`` (full name) in ``mode`` (default: the first mode holding it)."""
        if not isinstance(name, str):
            raise ConfigError(f"tensor name must be a str, got {type(name).__name__} {name!r}")
        entries = self._entries()
        self._check_mode(mode, entries)
        for m, n, node, var in entries:
            if n == name and mode in (None, m):
                return node[var]  # type: ignore[return-value]
        where = f" in mode {mode!r}" if mode else ""
        names = {n for _, n, _, _ in entries}
        raise MissingTensorError(f"no tensor {name!r}{where}{did_you_mean(name, names)}")

    def module(self, path: str, *, mode: str | None = None) -> xr.DataTree:
        """The node of module ``path`` (in ``mode``; default the first mode that has it)."""
        self._check_mode(mode, self._entries())
        nodes = sorted(
            (
                node
                for node in self._obj.subtree
                if node.dataset.attrs.get("module") == path
                and mode in (None, node.dataset.attrs.get("mode"))
            ),
            key=lambda node: _mode_rank(str(node.dataset.attrs.get("mode", ""))),
        )
        if not nodes:
            known = {str(n.dataset.attrs.get("module")) for n in self._obj.subtree}
            raise MissingTensorError(f"no module {path!r} in this tree{did_you_mean(path, known)}")
        return nodes[0]

    @property
    def modules(self) -> dict[str, Any]:
        """The module tree recorded by the hook (``{path: {type, params, buffers, config}}``)."""
        return dict(self._obj.root.attrs.get("modules") or self._obj.attrs.get("modules") or {})

    @property
    def collections(self) -> dict[str, list[str]]:
        """``{collection: [tensor names]}`` below this node."""
        return _collections(
            (n, str(node[var].attrs.get("collection", ""))) for _, n, node, var in self._entries()
        )
