"""smdebug-style access to a dump: :class:`Trial` and :class:`TrialTensor`.

Values come back as numpy arrays, read eagerly one record at a time; use
:func:`~tdump.analyze.open_dump` for lazy, whole-run work.

Examples
--------
>>> import numpy as np
>>> from tdump._format import StoreWriter
>>> w = StoreWriter.create("memory://doc/trial.zarr")
>>> for i, step in enumerate([0, 100]):
...     w.write_tensor("train", i, "fc.weight", np.full((2, 2), i, "f4"), dims=("out_feature", "in_feature"),
...                    attrs={"collection": "weights", "kind": "parameter", "module": "fc"})
...     w.write_tensor("train", i, "scalars.lr", np.asarray(0.1 / (i + 1)),
...                    attrs={"collection": "scalars", "kind": "scalar", "module": ""})
...     w.commit("train", i, step=step, batch_size=8)
>>> trial = Trial("memory://doc/trial.zarr")
>>> trial.modes(), trial.steps(), trial.tensor_names(collection="weights")
(['train'], [0, 100], ['fc.weight'])
>>> trial.tensor("fc.weight").value(100).tolist()
[[1.0, 1.0], [1.0, 1.0]]
>>> trial.scalar("lr")
{0: 0.1, 100: 0.05}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from tdump._format import StoreReader
from tdump._names import dump_path, no_mode_steps
from tdump._validate import DAMAGE
from tdump.analyze._open import check_mode_name, did_you_mean, open_reader
from tdump.analyze._tasks import corrupt_chunk
from tdump.errors import ConfigError, MissingTensorError, check_choice, compile_regex

__all__ = ["Trial", "TrialTensor"]


class Trial:
    """A dump opened for smdebug-style reading.

    Parameters
    ----------
    path
        Local path or fsspec URL of the dump.
    rank
        Which writing process's part to read (DDP rank).
    storage_options
        Passed to fsspec for URLs.

    Notes
    -----
    What the trial sees is fixed when it is opened; call :meth:`refresh` to see records
    a writer committed since. Each mode has its own step counter, so where a call
    takes ``mode=None`` and several modes hold the same step, the first mode in
    ``train, eval, predict, global`` order wins.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rank: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._path = dump_path(path)
        self._storage_options = storage_options
        self.rank = rank
        self._reader: StoreReader = open_reader(self._path, storage_options)
        self.refresh()

    def __repr__(self) -> str:
        return f"Trial({self.path!r}, modes={self.modes()}, tensors={len(self.tensor_names())})"

    @property
    def path(self) -> str:
        """The dump's path or URL."""
        return self._path

    @property
    def reader(self) -> StoreReader:
        """The underlying low-level :class:`~tdump._format.StoreReader`."""
        return self._reader

    def refresh(self) -> None:
        """Re-read the store: records committed by a writer since the last look become visible."""
        self._reader = open_reader(self._path, self._storage_options)
        self._modes = self._reader.modes(self.rank)
        self._records = {m: self._reader.records(m, self.rank) for m in self._modes}
        self._names = {m: self._reader.tensor_names(m, self.rank) for m in self._modes}
        self._attrs: dict[tuple[str, str], dict[str, Any]] = {}
        self._saved: dict[tuple[str, str], np.ndarray] = {}

    # -- the run
    def modes(self) -> list[str]:
        """Modes with at least one committed record (``train``, ``eval``, ``predict``, ``global``)."""
        return list(self._modes)

    def _check_mode(self, mode: str) -> str:
        """``mode`` if it has records; a misspelt name is a :class:`ConfigError` (with the
        closest name), a mode without records a :class:`MissingTensorError`."""
        if mode not in self._modes:
            check_mode_name(mode)
            raise MissingTensorError(no_mode_steps(self.path, mode, self._modes))
        return mode

    def _modes_for(self, mode: str | None) -> list[str]:
        return list(self._modes) if mode is None else [self._check_mode(mode)]

    def steps(self, mode: str | None = None) -> list[int]:
        """Saved steps of ``mode``, ascending (``None``: of every mode, merged)."""
        found: set[int] = set()
        for m in self._modes_for(mode):
            found.update(int(s) for s in self._records[m]["step"])
        return sorted(found)

    def records(self, mode: str) -> dict[str, np.ndarray]:
        """Committed records of ``mode``: arrays ``step``, ``batch_size``, ``time``."""
        return {k: v.copy() for k, v in self._records[self._check_mode(mode)].items()}

    def meta(self) -> dict[str, Any]:
        """The rank's attributes: ``config``, ``modules``, ``calls``, ``writer``, ``created`` ..."""
        return self._reader.meta(self.rank)

    @property
    def modules(self) -> dict[str, Any]:
        """The module tree: ``{path: {"type", "params", "buffers", "config"}}`` (root is ``""``)."""
        return dict(self.meta().get("modules") or {})

    @property
    def config(self) -> dict[str, Any]:
        """The hook configuration the dump was written with."""
        return dict(self.meta().get("config") or {})

    def calls(self, mode: str = "train") -> list[dict[str, Any]]:
        """The dataflow of the first saved forward pass of ``mode`` (see docs/FORMAT.md).

        Empty when the hook recorded none for ``mode``; a misspelt mode raises
        :class:`~tdump.errors.ConfigError`.
        """
        check_mode_name(mode)
        return list((self.meta().get("calls") or {}).get(mode, []))

    # -- tensors
    def tensor_attrs(self, name: str, mode: str) -> dict[str, Any]:
        """Attributes of tensor ``name`` in ``mode`` (``collection``, ``kind``, ``module``, ``dims`` ...)."""
        key = (mode, name)
        if key not in self._attrs:
            self._attrs[key] = self._reader.tensor_attrs(mode, name, self.rank)
        return self._attrs[key]

    def tensor_names(
        self,
        regex: str | None = None,
        *,
        collection: str | None = None,
        mode: str | None = None,
    ) -> list[str]:
        """Names of stored tensors, sorted.

        Parameters
        ----------
        regex
            Keep names matching this regular expression (``re.search``).
        collection
            Keep tensors of this collection (``weights``, ``activations`` ...).
        mode
            Only tensors stored for this mode (default: any mode).

        Raises
        ------
        SelectionError
            ``regex`` does not compile.
        ConfigError
            ``collection`` names no collection (they are plural: ``weights``, not
            ``weight``) or ``mode`` no mode.
        """
        pattern = compile_regex(regex)
        if collection is not None:
            self._check_collection(collection)
        out: set[str] = set()
        for m in self._modes_for(mode):
            for name in self._names[m]:
                if pattern is not None and not pattern.search(name):
                    continue
                if (
                    collection is not None
                    and self.tensor_attrs(name, m).get("collection") != collection
                ):
                    continue
                out.add(name)
        return sorted(out)

    def _check_collection(self, collection: object) -> None:
        """A collection this dump has, or one tdump records (then it is just empty here)."""
        from tdump.capture._config import COLLECTIONS  # the names docs/FORMAT.md lists

        present = tuple(self.collections())
        if isinstance(collection, str) and collection in present:
            return
        check_choice(
            collection, (*COLLECTIONS, *(c for c in present if c not in COLLECTIONS)), "collection"
        )

    def collections(self) -> dict[str, list[str]]:
        """``{collection: [tensor names]}`` over all modes."""
        out: dict[str, set[str]] = {}
        for m in self._modes:
            for name in self._names[m]:
                coll = str(self.tensor_attrs(name, m).get("collection", ""))
                out.setdefault(coll, set()).add(name)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def has_tensor(self, name: str) -> bool:
        """Whether any mode stores tensor ``name``."""
        return any(name in self._names[m] for m in self._modes)

    def tensor(self, name: str) -> TrialTensor:
        """The tensor called ``name`` (see docs/FORMAT.md for the naming scheme).

        Raises
        ------
        MissingTensorError
            No mode stores ``name``; the message suggests the closest name.
        """
        if not isinstance(name, str):
            raise ConfigError(
                f"tensor name must be a str (e.g. 'conv1.weight'), got {type(name).__name__} {name!r}"
            )
        if not self.has_tensor(name):
            known = {n for m in self._modes for n in self._names[m]}
            raise MissingTensorError(
                f"no tensor {name!r} in {self.path}{did_you_mean(name, known)}"
            )
        return TrialTensor(self, name)

    def _saved_steps(self, mode: str, name: str) -> np.ndarray:
        key = (mode, name)
        if key not in self._saved:
            if name not in self._names.get(mode, ()):
                self._saved[key] = np.empty(0, np.int64)
            else:
                self._saved[key] = self._reader.saved_records(
                    mode, name, self.rank, committed=len(self._records[mode]["step"])
                )
        return self._saved[key]

    def scalar(self, name: str, mode: str | None = None) -> dict[int, float]:
        """``{step: value}`` of a scalar saved with ``hook.save_scalar(name, v)`` (or any 0-d tensor).

        ``name`` may be given with or without the ``scalars.`` prefix.
        """
        if not isinstance(name, str):
            raise ConfigError(f"scalar name must be a str (e.g. 'lr'), got {type(name).__name__}")
        full = name if self.has_tensor(name) or name.startswith("scalars.") else f"scalars.{name}"
        tensor = self.tensor(full)
        if tensor.shape(tensor.modes()[0]) != ():
            raise ConfigError(f"tensor {full!r} is not a scalar; use trial.tensor({full!r})")
        return {s: float(tensor.value(s, mode=mode)) for s in tensor.steps(mode=mode)}


class TrialTensor:
    """One tensor of a :class:`Trial`: its saved steps and values.

    Examples
    --------
    >>> t = Trial("memory://doc/trial.zarr").tensor("fc.weight")  # see module example
    >>> t.steps(), t.collection, t.value(0, mode="train").shape
    ([0, 100], 'weights', (2, 2))
    """

    def __init__(self, trial: Trial, name: str) -> None:
        self._trial = trial
        self.name = name

    def __repr__(self) -> str:
        return f"TrialTensor({self.name!r}, modes={self.modes()})"

    def modes(self) -> list[str]:
        """Modes that store this tensor."""
        return [m for m in self._trial.modes() if self.name in self._trial._names[m]]

    def _mode(self, mode: str | None) -> str:
        modes = self.modes()
        if mode is None:
            return modes[0]
        if mode not in modes:
            check_mode_name(mode)
            raise MissingTensorError(
                f"tensor {self.name!r} is not stored for mode {mode!r}; it is for {', '.join(modes)}"
            )
        return mode

    @property
    def attrs(self) -> dict[str, Any]:
        """Attributes (``collection``, ``kind``, ``module``, ``call``, ``dims`` ...) in its first mode."""
        return dict(self._trial.tensor_attrs(self.name, self.modes()[0]))

    @property
    def collection(self) -> str:
        """The tensor's collection (``weights``, ``activations`` ...)."""
        return str(self.attrs.get("collection", ""))

    def dims(self, mode: str | None = None) -> tuple[str, ...]:
        """Dimension names of one value (``batch``, ``channel`` ...)."""
        return tuple(self._trial.tensor_attrs(self.name, self._mode(mode))["dims"])

    def shape(self, mode: str | None = None) -> tuple[int, ...]:
        """Stored shape of one value (the batch extent is the largest batch seen)."""
        arr = self._trial.reader.array(self._mode(mode), self.name, self._trial.rank)
        return tuple(int(s) for s in arr.shape[1:])

    def dtype(self, mode: str | None = None) -> np.dtype[Any]:
        """Storage dtype (see ``attrs["source_dtype"]`` for the dtype in training)."""
        return np.dtype(
            self._trial.reader.array(self._mode(mode), self.name, self._trial.rank).dtype
        )

    def steps(self, mode: str | None = None) -> list[int]:
        """Steps at which this tensor holds data (``None``: any mode), ascending."""
        found: set[int] = set()
        modes = self.modes() if mode is None else [self._mode(mode)]
        for m in modes:
            rows = self._trial._saved_steps(m, self.name)
            found.update(int(s) for s in self._trial._records[m]["step"][rows])
        return sorted(found)

    def value(self, step: int, mode: str | None = None) -> np.ndarray:
        """The value saved at ``step`` as a numpy array (padded batch rows removed).

        Raises
        ------
        ConfigError
            ``step`` is not a whole number (``"5"``, ``2.5``).
        MissingTensorError
            The tensor was not saved at ``step`` (in ``mode``); the message lists nearby steps.
        CorruptStoreError
            The record's chunk does not decode (a :class:`~tdump.errors.NotADumpError`).
        """
        step = _step_number(step)
        modes = self.modes() if mode is None else [self._mode(mode)]
        for m in modes:
            rec = self._trial._records[m]
            rows = self._trial._saved_steps(m, self.name)
            hit = rows[rec["step"][rows] == step]
            if hit.size:
                row = int(hit[-1])
                out = self._read(m, row)
                bs = int(rec["batch_size"][row])
                if bs >= 0 and self.dims(m)[:1] == ("batch",):
                    out = out[:bs]
                return out
        saved = self.steps(mode)
        near = sorted(saved, key=lambda s: abs(s - step))[:3]
        where = f" in mode {mode!r}" if mode else ""
        hint = f"; nearest saved steps: {sorted(near)}" if near else "; it holds no data yet"
        raise MissingTensorError(f"tensor {self.name!r} has no value at step {step}{where}{hint}")

    def _read(self, mode: str, row: int) -> np.ndarray:
        """Record ``row`` of ``mode``; a damaged chunk is a :class:`CorruptStoreError`, as in ``rank``."""
        trial = self._trial
        arr = trial.reader.array(mode, self.name, trial.rank)
        try:
            return np.asarray(arr[row])
        except DAMAGE as exc:
            raise corrupt_chunk(trial.path, arr, row, exc) from None

    def values(self, mode: str | None = None) -> dict[int, np.ndarray]:
        """``{step: value}`` for every saved step of ``mode`` (default: the first mode storing it)."""
        m = self._mode(mode)
        return {s: self.value(s, mode=m) for s in self.steps(mode=m)}


def _step_number(step: object) -> int:
    """``step`` as an int: an int, a numpy integer or a whole float; else :class:`ConfigError`."""
    if isinstance(step, int | np.integer) and not isinstance(step, bool):
        return int(step)
    if isinstance(step, float | np.floating) and float(step).is_integer():
        return int(step)
    raise ConfigError(
        f"step must be a step number (an int), got {type(step).__name__} {step!r}; "
        "tensor.steps() lists the saved ones"
    )
