"""Rank conv filters from a dump with Dask: out of core, parallel, one task per stored chunk.

The pipeline: plan (which tensors each conv layer's criterion needs, from the store's
``modules``/``calls`` dataflow) -> one task per saved record that, layer after layer,
reads that record's chunk of each source tensor (one chunk = one record of one tensor)
and reduces it at once to a per-channel float64 vector -> tree-reduction of the
per-record ``{layer: (sum, count)}`` partials (:mod:`tdump.analyze._tasks`) -> scores
-> a :class:`~tdump.analyze.RankTable` (``rank_table``) or its
:class:`pandas.DataFrame` (``rank``), ``docs/FORMAT.md`` §2. Peak memory is about
(one record of the largest tensor pair, plus its working set) x (workers), however
big the dump is.

Examples
--------
>>> import tdump.analyze as ta                                    # doctest: +SKIP
>>> df = ta.rank("dump.zarr", criterion="taylor", steps="100:2000")  # doctest: +SKIP
>>> df.nsmallest(10, "score_norm")                              # doctest: +SKIP
>>> ta.write_ranks(df, "ranks.parquet")                         # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tdump._format import StoreReader
from tdump._preload import preload
from tdump._version import __version__
from tdump.analyze._args import StepsArg, check_args, parse_steps
from tdump.analyze._criteria import get_criterion
from tdump.analyze._diagnose import (
    one_step_note,
    warn_non_finite,
)
from tdump.analyze._rank_plan import (
    Record,
    plan_jobs,
    read_dataflow,
    select_layers,
    select_records,
    task_args,
)
from tdump.analyze._ranks_io import RANKS_FORMAT, RANKS_VERSION, RankTable
from tdump.analyze._schedule import (
    DEFAULT_CONNECT_TIMEOUT,
    ProgressFn,
    check_address,
    check_options,
    execute,
    ignored_workers_note,
    runs_in_process,
)
from tdump.analyze._tasks import Partials, Work, _combine, _record_task, _share_arrays, check_scores
from tdump.errors import (
    MissingTensorError,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["parse_steps", "rank", "rank_table", "scored_layers"]


# --------------------------------------------------------------------------- public API
def rank(
    dump: str | os.PathLike[str],
    criterion: str = "taylor",
    mode: str = "train",
    steps: StepsArg = None,
    layers: str | None = None,
    normalize: bool = True,
    signed: bool = False,
    scheduler: Any = "threads",
    workers: int | None = None,
    memory_limit: str | int | None = None,
    progress: bool | ProgressFn = True,
    storage_options: Mapping[str, Any] | None = None,
    split_every: int = 8,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    keep_nan: bool = False,
) -> pd.DataFrame:
    """Rank every conv filter (and hidden Linear feature) of a dump by ``criterion``.

    Parameters
    ----------
    dump
        Path or fsspec URL of a ``tdump.store`` dump.
    criterion
        A registered criterion: ``taylor`` (default), ``taylor-signed``, ``l1``, ``bn-gamma``,
        ``apoz``, ``taylor-weight`` (see ``docs/ranking.md``).
    mode
        Store mode whose saved steps are used.
    steps
        Saved steps to use: ``None`` (all), ``"100:2000"`` (``100 <= step < 2000``), a slice,
        a step number or a list of them. A stride ``"START:STOP:K"`` keeps the saved steps
        whose number is ``START + n*K`` (``START`` omitted: 0), not every K-th saved step
        (saved steps 0, 3, 7 with ``"0:10:2"``: step 0 only); ``K`` must be positive.
    layers
        Regex (``re.search``) on layer paths; ``None`` ranks every layer with data: the
        convs and the hidden Linears (2-D outputs that feed another layer).
    normalize
        Layer-wise L2 normalisation into ``score_norm``.
    signed
        With ``taylor``: the signed variant (``taylor-signed``).
    scheduler
        ``"threads"``, ``"processes"``, ``"sync"``, a ``tcp://`` scheduler address, or a
        ``distributed.Client``.
    workers
        Worker threads/processes (default: the CPU count).
    memory_limit
        Per-worker memory limit (e.g. ``"2GB"``); with ``"processes"`` starts a
        ``distributed.LocalCluster`` that enforces it.
    progress
        ``True`` for a progress bar on stderr, ``False`` for none, or ``f(done, total)``.
    storage_options
        fsspec options for URLs.
    split_every
        Fan-in of the tree reduction.
    connect_timeout
        Seconds a scheduler address gets to answer; an address that is no Dask
        scheduler (an HTTP server, nothing) is refused with one line within it.
    keep_nan
        A record whose tensors hold NaN or Inf gives a layer non-finite sums. By default
        that record is left out of the layer's scores (a layer with no finite record is
        left out of the table); ``True`` keeps it, so the layer's scores are NaN. Either
        way a :class:`~tdump.errors.NonFiniteWarning` names the tensors and steps.

    Returns
    -------
    pandas.DataFrame
        The ranks table of ``docs/FORMAT.md`` §2; ``df.attrs["tdump"]`` holds its metadata.

    Examples
    --------
    >>> df = rank("dump.zarr", criterion="l1", progress=False)  # doctest: +SKIP
    >>> df.groupby("layer")["score_norm"].describe()          # doctest: +SKIP
    """
    return rank_table(
        dump=dump,
        criterion=criterion,
        mode=mode,
        steps=steps,
        layers=layers,
        normalize=normalize,
        signed=signed,
        scheduler=scheduler,
        workers=workers,
        memory_limit=memory_limit,
        progress=progress,
        storage_options=storage_options,
        split_every=split_every,
        connect_timeout=connect_timeout,
        keep_nan=keep_nan,
    ).to_frame()


def scored_layers(
    dump: str | os.PathLike[str],
    criterion: str = "taylor",
    mode: str = "train",
    layers: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """The layers :func:`rank` would score from ``dump``, reading no tensor values.

    :func:`rank`'s own plan over what ``dump`` recorded (``tdump loop`` checks its
    ``--count`` with it before ranking). A layer whose every selected record holds NaN
    or Inf, which the ranking leaves out, is still listed. Parameters as :func:`rank`.

    Raises
    ------
    TdumpError
        What :func:`rank` would raise before reading values (no steps in ``mode``,
        nothing the criterion can score, ...).

    Examples
    --------
    >>> scored_layers("sample_dumps/tiny.zarr")  # doctest: +SKIP
    ['conv1', 'conv2']
    """
    check_args(dump, criterion, mode, layers, 8, DEFAULT_CONNECT_TIMEOUT, False)
    crit = get_criterion(criterion)
    reader = StoreReader(os.fspath(dump), storage_options=storage_options, snapshot=True)
    records = select_records(reader, mode, None)
    flow = read_dataflow(reader, mode)
    jobs = plan_jobs(
        reader, crit, mode, select_layers(flow, layers), records, layers is not None, [], {}
    )
    return [job.layer for job in jobs]


def rank_table(
    dump: str | os.PathLike[str],
    criterion: str = "taylor",
    mode: str = "train",
    steps: StepsArg = None,
    layers: str | None = None,
    normalize: bool = True,
    signed: bool = False,
    scheduler: Any = "threads",
    workers: int | None = None,
    memory_limit: str | int | None = None,
    progress: bool | ProgressFn = True,
    storage_options: Mapping[str, Any] | None = None,
    split_every: int = 8,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    keep_nan: bool = False,
) -> RankTable:
    """:func:`rank` without pandas: the same table as numpy columns (:class:`RankTable`).

    ``tdump rank`` uses it (pandas takes 0.35 s to import, twice that from a cold page
    cache); :func:`write_ranks` writes either. Parameters as :func:`rank`.

    Examples
    --------
    >>> from tdump.analyze import write_ranks
    >>> table = rank_table("dump.zarr", progress=False)      # doctest: +SKIP
    >>> [table.columns["layer"][i] for i in table.weakest(3)]  # doctest: +SKIP
    >>> write_ranks(table, "ranks.parquet")                  # doctest: +SKIP
    """
    check_args(dump, criterion, mode, layers, split_every, connect_timeout, progress)
    crit = get_criterion(criterion, signed=signed)
    parse_steps(steps)  # a bad selection fails before the dump is opened
    check_options(scheduler, workers, memory_limit)
    if isinstance(scheduler, str) and "://" in scheduler:
        check_address(scheduler, connect_timeout)  # before any reading: fail at once
    reader = StoreReader(os.fspath(dump), storage_options=storage_options, snapshot=True)
    records = select_records(reader, mode, steps)
    flow = read_dataflow(reader, mode)
    notes: list[str] = []
    skipped: dict[str, str] = {}
    jobs = plan_jobs(
        reader,
        crit,
        mode,
        select_layers(flow, layers),
        records,
        layers is not None,
        notes,
        skipped,
    )
    used_steps = sorted({r.step for job in jobs for r in job.records})
    if crit.all_records and len(used_steps) == 1:
        notes.append(one_step_note(crit.name, mode, used_steps[0]))
    workers_note = ignored_workers_note(scheduler, workers)
    if workers_note is not None:
        notes.append(workers_note)
    so_json = json.dumps(dict(storage_options or {}), sort_keys=True)
    if runs_in_process(scheduler):
        planned = {
            (r.rank, name)
            for job in jobs
            for r in job.records
            for name in job.plan.sources.values()
        }
        _share_arrays(reader, so_json, mode, planned)
    by_record: dict[Record, list[Work]] = {}
    for i, job in enumerate(jobs):
        for rec in job.records:
            by_record.setdefault(rec, []).append(
                (i, job.plan, job.batched, job.layer, job.channels, job.last)
            )
    leaves = [
        (_record_task, crit, work, reader.location, so_json, mode, *task_args(r, keep_nan))
        for r, work in sorted(by_record.items(), key=lambda kv: (kv[0].rank, kv[0].index))
    ]
    # pyarrow for the write_ranks that usually follows loads while the records are read
    # (its import would otherwise add ~0.3 s to a cold start)
    preload("pyarrow.parquet")
    combined: Partials = execute(  # type: ignore[assignment]
        leaves,
        _combine,
        scheduler=scheduler,
        workers=workers,
        memory_limit=memory_limit,
        progress=progress,
        split_every=split_every,
        path=reader.path,
        connect_timeout=connect_timeout,
    )
    left_out = warn_non_finite(combined.non_finite, [j.layer for j in jobs], keep_nan)
    layers_out: list[tuple[str, np.ndarray, int, int, str]] = []
    kept_jobs = []
    for i, job in enumerate(jobs):
        if i not in combined.sums:
            continue  # every record of this layer was non-finite (warned above)
        total, count = combined.sums[i]
        channels = len(total) if job.channels is None else job.channels
        score = check_scores(crit, "finish", crit.finish(total, count), job.layer, channels)
        score = np.repeat(score, job.unit)  # a run a PixelShuffle made one channel: one score
        used_records = [r for r in job.records if r.step not in left_out.get(i, ())]
        n_steps = len({r.step for r in used_records})
        examples = sum(max(r.batch_size, 0) for r in used_records) if crit.uses_batch else 0
        kept_jobs.append(job)
        sources = ",".join(job.plan.sources.values())
        layers_out.append((job.layer, score, n_steps, examples, sources))
    if not layers_out:
        raise MissingTensorError(
            f"every selected record of {reader.path} holds NaN or Inf in the tensors ranking "
            "needs; nothing finite to rank (keep_nan=True / --keep-nan ranks them as NaN)"
        )
    used = [r.step for job in kept_jobs for r in job.records]
    meta = {
        "format": RANKS_FORMAT,
        "format_version": RANKS_VERSION,
        "criterion": crit.name,
        "normalize": bool(normalize),
        "dump": reader.path,
        "mode": mode,
        "steps": [int(min(used)), int(max(used))],
        "layers": layers,
        "linear_layers": [job.layer for job in kept_jobs if flow.is_linear(job.layer)],
        "skipped": skipped,
        "notes": notes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tdump_version": __version__,
    }
    return RankTable.from_layers(
        layers_out, criterion=crit.name, mode=mode, meta=meta, normalize=normalize
    )
