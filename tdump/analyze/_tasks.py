"""The per-record ranking task: read one saved record's chunks and reduce them at once.

:func:`_record_task` is what each Dask task runs (threads, processes or cluster
workers): per layer job it reads the record's chunk of each source tensor (a file
read and one numcodecs decode on local disks) and hands them to the criterion,
keeping only a per-channel float64 vector. :func:`_combine` is the tree-reduction
step. Arrays are opened once per worker process and cached in ``_ARRAYS``.

Examples
--------
>>> a = Partials({0: (np.array([1.0, 2.0]), 3)})
>>> b = Partials({0: (np.array([0.5, 0.5]), 1)})
>>> total, count = _combine(a, b).sums[0]
>>> total.tolist(), count
([1.5, 2.5], 4)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tdump._chunks import Scratch, chunk_files
from tdump._format import StoreReader
from tdump._validate import DAMAGE, damaged_chunk
from tdump.analyze._criteria import Criterion, Plan
from tdump.errors import ConfigError, CorruptStoreError, TdumpError

__all__ = ["NonFinite", "Partials", "corrupt_chunk"]

_ARRAYS: dict[tuple[str, str, int, str, str], _RecordReader] = {}
_ARRAYS_LOCK = threading.Lock()


def _open_array(path: str, so_json: str, rank: int, mode: str, name: str) -> _RecordReader:
    """A reader of ``name``'s records, opened once per worker process."""
    key = (path, so_json, rank, mode, name)
    with _ARRAYS_LOCK:
        arr = _ARRAYS.get(key)
    if arr is None:
        reader = StoreReader(path, storage_options=json.loads(so_json) or None)
        arr = _RecordReader(reader.array(mode, name, rank), reader.path)
        with _ARRAYS_LOCK:
            _ARRAYS[key] = arr
    return arr


def _share_arrays(
    reader: StoreReader, so_json: str, mode: str, sources: Iterable[tuple[int, str]]
) -> None:
    """Hand the arrays the planner opened (``(rank, name)`` each) to in-process tasks.

    Each array is then opened once per call, and replacing what an earlier call left
    keeps a growing dump's readers current. Worker processes open their own.
    """
    for rank, name in sources:
        arr = _RecordReader(reader.array(mode, name, rank), reader.path)
        with _ARRAYS_LOCK:
            _ARRAYS[(reader.location, so_json, rank, mode, name)] = arr


def corrupt_chunk(path: str, arr: Any, index: int, exc: BaseException) -> CorruptStoreError:
    """The one-line error for record ``index`` of ``arr`` that zarr cannot decode.

    Every reader (``rank``, ``open_dump``, ``Trial``) raises :class:`CorruptStoreError`
    for a damaged chunk; it is a :class:`~tdump.errors.NotADumpError` too.
    """
    return CorruptStoreError(str(damaged_chunk(path, arr, index, exc)))


class _RecordReader:
    """Read one record (row 0-axis) of a tensor array.

    Fast path: on a local disk with tdump's codecs a record is one file
    (:mod:`tdump._chunks`), read and decoded with numcodecs in one call, skipping
    zarr's async machinery (about 2x faster per chunk). Anything else (object stores,
    sharding, filters, a grown batch axis) goes through zarr. A missing chunk reads as
    the fill value either way.

    With ``scratch=True`` the file bytes and the decoded values land in buffers owned
    by the calling thread and reused by its next ``scratch`` read of this array: no
    fresh pages per chunk. That matters on Dask workers, whose allocator hands large
    freed blocks back to the OS at once (``MALLOC_TRIM_THRESHOLD_``), so every new
    chunk-sized array would page-fault all over again.
    """

    def __init__(self, arr: Any, path: str = "") -> None:
        self.arr = arr
        self.path = path  # the dump, for error messages
        self.files = chunk_files(arr)
        self._threads = threading.local()  # each thread's Scratch

    def read(
        self,
        index: int,
        rows: int | None = None,
        *,
        scratch: bool = False,
        step: int | None = None,
    ) -> np.ndarray:
        """Record ``index`` (its first ``rows`` batch rows if given).

        ``scratch=True``: the result is valid until this thread's next scratch read of
        this array (see the class docstring); otherwise it is a fresh array. A chunk
        that does not decode to exactly one record raises a one-line
        :class:`~tdump.errors.CorruptStoreError` naming tensor, record and ``step``
        (from the direct file path) or :class:`~tdump.errors.NotADumpError` (through zarr).
        """
        try:
            return self._read(index, rows, scratch, step)
        except TdumpError:
            raise  # already one line naming tensor, record and step
        except DAMAGE as exc:
            raise damaged_chunk(self.path, self.arr, index, exc) from None

    def _read(self, index: int, rows: int | None, scratch: bool, step: int | None) -> np.ndarray:
        files = self.files
        if files is None:
            value = np.asarray(self.arr[index] if rows is None else self.arr[index, :rows])
        elif scratch:
            if not hasattr(self._threads, "scratch"):
                self._threads.scratch = Scratch()
            value = files.read(index, self._threads.scratch, step=step)
        else:
            value = files.read(index, step=step)
        return value if rows is None or files is None else value[:rows]


@dataclass(frozen=True)
class NonFinite:
    """A record left out of (or, with ``keep_nan``, kept in) one layer job's sums."""

    job: int
    tensors: tuple[str, ...]
    step: int
    count: int  # non-finite values in the record's tensors


@dataclass
class Partials:
    """Per-job ``(per-channel float64 sum, count)`` of some records, and the non-finite records seen."""

    sums: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    non_finite: list[NonFinite] = field(default_factory=list)


#: One layer job of a record task: ``(job index, plan, batched roles, layer, out channels,
#: roles with channels last)``.
Work = tuple[int, Plan, Mapping[str, bool], str, int | None, frozenset[str]]


def check_scores(
    criterion: Criterion, what: str, value: Any, layer: str, channels: int | None
) -> np.ndarray:
    """``value`` as a float64 vector of ``channels`` entries, else a one-line :class:`ConfigError`.

    A plug-in criterion whose ``partial``/``finish`` returns the wrong length would
    otherwise give a table with too few rows (or, through numpy broadcasting, the
    same number for every channel).

    >>> from tdump.analyze._criteria import get_criterion
    >>> check_scores(get_criterion("l1"), "partial", [1, 2], "conv1", 3)
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: criterion 'l1': partial() returned 2 values for layer 'conv1', which has 3 output channels; return one value per output channel
    """
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        vec = None
    if vec is None or vec.ndim != 1 or (channels is not None and vec.shape[0] != channels):
        got = (
            f"a {type(value).__name__}"
            if vec is None
            else (f"{vec.shape[0]} values" if vec.ndim == 1 else f"an array of shape {vec.shape}")
        )
        has = f", which has {channels} output channels" if channels is not None else ""
        raise ConfigError(
            f"criterion {criterion.name!r}: {what}() returned {got} for layer {layer!r}{has}; "
            "return one value per output channel"
        )
    return vec


def _partial(
    criterion: Criterion,
    values: Mapping[str, np.ndarray],
    plan: Plan,
    layer: str,
    channels: int | None,
) -> tuple[np.ndarray, int]:
    """``criterion.partial`` with its result checked: ``(one float per channel, count)``."""
    out = criterion.partial(values, plan)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ConfigError(
            f"criterion {criterion.name!r}: partial() returned {type(out).__name__} for layer "
            f"{layer!r}; return a (per-channel sums, count) tuple"
        )
    total, count = out
    try:
        n = int(count)
        ok = n == count and n >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"criterion {criterion.name!r}: partial() returned count {count!r} for layer "
            f"{layer!r}; return the number of examples it sums over (or 1), an int >= 0"
        )
    return check_scores(criterion, "partial", total, layer, channels), n


def _record_task(
    criterion: Criterion,
    work: Sequence[Work],
    path: str,
    so_json: str,
    mode: str,
    rank: int,
    index: int,
    batch_size: int,
    step: int = -1,
    keep_nan: bool = False,
) -> Partials:
    """Reduce one saved record: per layer job, read its chunk(s) and reduce them at once.

    Only one layer's tensors are in memory at a time; the result is a per-channel
    float64 vector and a count per job index. A job whose vector is not finite (the
    record holds NaN or Inf) is left out of the sums unless ``keep_nan``, and is
    reported in :attr:`Partials.non_finite` either way.
    """
    for _, plan, *_ in work:  # queue the whole record's reads now: the disk works while we compute
        for name in plan.sources.values():
            files = _open_array(path, so_json, rank, mode, name).files
            if files is not None:
                files.prefetch(index)
    out = Partials()
    for job_index, plan, batched, layer, channels, last in work:
        values: dict[str, np.ndarray] = {}
        for role, name in plan.sources.items():
            arr = _open_array(path, so_json, rank, mode, name)
            rows = batch_size if batched.get(role) and batch_size > 0 else None
            value = arr.read(index, rows, scratch=True, step=step)
            # a channels-last Linear's (batch, tokens, features): criteria read channels at 1
            values[role] = np.moveaxis(value, -1, 1) if role in last and value.ndim > 2 else value
        total, count = _partial(criterion, values, plan, layer, channels)
        if not np.isfinite(total).all():  # a per-channel check: the rare case pays the count
            bad = sum(int(v.size - np.count_nonzero(np.isfinite(v))) for v in values.values())
            out.non_finite.append(NonFinite(job_index, tuple(plan.sources.values()), step, bad))
            if not keep_nan:
                continue
        del values
        out.sums[job_index] = (total, count)
    return out


def _combine(*parts: Partials) -> Partials:
    """Sum partials per job (the tree-reduction step)."""
    out = Partials()
    for part in parts:
        out.non_finite.extend(part.non_finite)
        for key, (vec, n) in part.sums.items():
            if key in out.sums:
                total, count = out.sums[key]
                out.sums[key] = (total + vec, count + n)
            else:
                out.sums[key] = (vec, n)
    return out
