"""Run per-chunk tasks and their tree reduction on a Dask scheduler, with progress.

``execute`` takes a list of leaf tasks ``(func, *args)`` (one per saved record) and a
``combine(*results)`` function. Leaves are combined ``split_every`` at a time until one
result is left. Schedulers: dask's threaded, multiprocessing and
synchronous schedulers, a ``distributed.Client``, a scheduler address, or a
``distributed.LocalCluster`` started here when a per-worker memory limit is asked for.

Examples
--------
>>> import operator
>>> leaves = [(operator.mul, 2, 3), (operator.mul, 4, 5), (abs, -1)]
>>> execute(leaves, lambda *xs: sum(xs), scheduler="sync", progress=False)
27
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tdump.analyze._cluster import check_workers
from tdump.errors import ConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "ProgressFn",
    "check_address",
    "execute",
    "ignored_workers_note",
    "runs_in_process",
]

ProgressFn = Callable[[int, int], None]
_MIN_WORKER_MEMORY = 512 * 2**20
_LOCAL = {"threads", "threading", "processes", "multiprocessing", "sync", "synchronous"}
_IN_PROCESS = {"threads", "threading", "sync", "synchronous"}
_SYNC = {"sync", "synchronous"}
#: Seconds to wait for a scheduler address to answer (``--timeout``).
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Address schemes dask.distributed speaks (``distributed.comm.registry.backends``).
_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")
_DEFAULT_PORT = 8786


class _Bar:
    """Progress sink: a rich bar on stderr, a user callback, or nothing.

    The bar is drawn only on a terminal (or in Jupyter): on a pipe or a file rich can
    only leave a blank line behind, so there ``progress=True`` shows nothing.
    """

    def __init__(self, progress: bool | ProgressFn, total: int) -> None:
        self.total = total
        self.done = 0
        self._fn: ProgressFn | None = None
        self._rich: Any = None
        if callable(progress):
            self._fn = progress
        elif progress:
            from rich.console import Console

            console = Console(stderr=True)
            if not (console.is_terminal or console.is_jupyter):
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                TextColumn("ranking"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("records"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._task = self._rich.add_task("rank", total=total)
            self._rich.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._fn is not None:
            self._fn(self.done, self.total)
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _tree(leaves: list[Any], split_every: int, node: Callable[[list[Any], int, int], Any]) -> Any:
    """Reduce ``leaves`` with ``node(children, level, index)`` until one is left."""
    level = 0
    while len(leaves) > 1 or level == 0:
        leaves = [
            node(leaves[i : i + split_every], level, i // split_every)
            for i in range(0, len(leaves), split_every)
        ]
        level += 1
    return leaves[0]


def check_address(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
    """Refuse, with one line and within ``timeout`` seconds, an address that is no Dask scheduler.

    Checks the scheme, the host, TLS settings, then (for ``tcp://``) connects and
    listens for the scheduler's handshake: a Dask scheduler speaks first; an HTTP
    server (the dashboard, port 8787, is a common mistake) stays silent and, asked,
    answers ``HTTP/...``; anything else that answers in text is named.

    Examples
    --------
    >>> check_address("bogus://host:8786")
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: unknown scheduler address scheme 'bogus' in 'bogus://host:8786'; use tcp://HOST:8786 (or tls://, ws://, wss://, ucx://)
    """
    from urllib.parse import urlsplit

    scheme, _, rest = address.partition("://")
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"unknown scheduler address scheme {scheme!r} in {address!r}; use tcp://HOST:8786 "
            "(or tls://, ws://, wss://, ucx://)"
        )
    if scheme == "inproc":
        return
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        host, port = parts.hostname, parts.port or _DEFAULT_PORT
    except ValueError as exc:
        raise ConfigError(f"invalid scheduler address {address!r} ({exc})") from None
    if not host:
        raise ConfigError(f"scheduler address {address!r} names no host; use {scheme}://HOST:PORT")
    if scheme in ("tls", "wss"):
        import dask

        tls = dask.config.get("distributed.comm.tls", default={}) or {}
        if not (tls.get("ca-file") and (tls.get("client") or {}).get("cert")):
            raise ConfigError(
                f"{address} needs TLS certificates: set distributed.comm.tls.ca-file and "
                "distributed.comm.tls.client.cert/key in the Dask config (e.g. "
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE), or pass a distributed.Client from Python"
            )
    if scheme != "tcp":
        return
    _probe_tcp(address, host, port, timeout)


def _probe_tcp(address: str, host: str, port: int, timeout: float) -> None:
    import socket

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        why = (
            f"no answer within {timeout:g} s"
            if isinstance(exc, TimeoutError)
            else (exc.strerror or str(exc))
        )
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address} ({why}); "
            "check the address (a scheduler listens on port 8786 by default) and that it runs"
        ) from None
    with sock:
        sock.settimeout(min(timeout, 3.0))
        try:
            first = sock.recv(64)  # a Dask scheduler sends its handshake at once
        except TimeoutError:
            first = None
        except OSError as exc:
            raise ConfigError(
                f"the server at {address} closed the connection ({exc.strerror or exc}); "
                "it is not a Dask scheduler"
            ) from None
        if first is None:  # silent: ask in HTTP, whose servers wait for a request
            sock.settimeout(timeout)
            try:
                sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                first = sock.recv(256)
            except OSError:
                first = b""
            if first.startswith(b"HTTP/"):
                status = first.split(b"\r\n", 1)[0].decode("ascii", "replace")
                raise ConfigError(
                    f"an HTTP server answers at {address} ({status}), not a Dask scheduler; "
                    "the dashboard listens on port 8787, the scheduler on 8786 by default"
                )
            if not first:
                raise ConfigError(
                    f"nothing at {address} answered the Dask handshake within {timeout:g} s; "
                    "is it a Dask scheduler? (raise connect_timeout / --timeout for a slow network)"
                )
        if not first:
            raise ConfigError(
                f"the server at {address} closed the connection at once; it is not a Dask scheduler"
            )
        head = first[:8]
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head):  # text: a banner, not frames
            banner = first.split(b"\n", 1)[0].decode("ascii", "replace").strip()
            raise ConfigError(
                f"the server at {address} answered {banner!r}, not a Dask scheduler; "
                "check the address (a scheduler listens on port 8786 by default)"
            )


def runs_in_process(scheduler: Any) -> bool:
    """Whether ``scheduler`` runs the tasks in this process (``threads``, ``sync``)."""
    return isinstance(scheduler, str) and scheduler in _IN_PROCESS


def ignored_workers_note(scheduler: Any, workers: int | None) -> str | None:
    """A note when ``workers`` is set but ``scheduler`` does not use it, else ``None``.

    ``sync`` runs one task at a time; an address or a ``Client`` brings its cluster's
    own workers. Only ``threads`` and ``processes`` start workers here.

    >>> ignored_workers_note("sync", 4)
    '--workers 4 ignored: the sync scheduler runs one task at a time (use threads or processes)'
    >>> ignored_workers_note("threads", 4) is None
    True
    """
    if workers is None or (isinstance(scheduler, str) and scheduler in _LOCAL - _SYNC):
        return None
    if isinstance(scheduler, str) and scheduler in _SYNC:
        return (
            f"--workers {workers} ignored: the {scheduler} scheduler runs one task at a time "
            "(use threads or processes)"
        )
    return f"--workers {workers} ignored: a cluster runs the tasks on the workers it has"


def check_options(scheduler: Any, workers: Any, memory_limit: Any) -> None:
    """Refuse a bad ``scheduler``, ``workers`` or ``memory_limit`` with one line, before any work.

    Messages name the Python parameter and the ``tdump rank`` option
    (``workers / --workers``): these errors reach users of both.

    >>> check_options("threads", 0, None)
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: workers / --workers must be at least 1, got 0
    """
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise ConfigError(
                f"workers / --workers must be a whole number, got {type(workers).__name__} "
                f"{workers!r}"
            )
        if workers < 1:
            raise ConfigError(f"workers / --workers must be at least 1, got {workers}")
    if isinstance(scheduler, str):
        if scheduler not in _LOCAL and "://" not in scheduler:
            raise ConfigError(
                f"unknown scheduler {scheduler!r}; use threads, processes, sync, or a scheduler "
                "address like tcp://host:8786"
            )
    elif not _is_client(scheduler):
        raise ConfigError(
            f"scheduler must be a name (threads, processes, sync), an address like "
            f"tcp://host:8786 or a distributed.Client, got {type(scheduler).__name__}"
        )
    if memory_limit is None:
        return
    if runs_in_process(scheduler):
        raise ConfigError(
            "memory_limit / --memory-limit applies to worker processes; use "
            "scheduler='processes' (--scheduler processes) or a cluster"
        )
    limit = _parse_memory(memory_limit)
    if limit < _MIN_WORKER_MEMORY:
        raise ConfigError(
            f"memory_limit / --memory-limit {memory_limit} is too small: a Dask worker process "
            "needs about 200 MB itself and pauses at 80% of its limit; use at least 512MB"
        )


def _parse_memory(memory_limit: Any) -> int:
    """Bytes of a size like ``"2GB"`` or a byte count; a one-line :class:`ConfigError` otherwise."""
    bad = ConfigError(
        f"memory_limit / --memory-limit {memory_limit!r} is not a size; use e.g. '2GB', "
        "'512MB' or a number of bytes"
    )
    if isinstance(memory_limit, bool):
        raise bad
    if isinstance(memory_limit, int):
        return memory_limit
    if not isinstance(memory_limit, str):
        raise bad
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(memory_limit))
    except (ValueError, TypeError):
        raise bad from None


def _is_client(obj: Any) -> bool:
    """Whether ``obj`` is a ``distributed.Client`` (without importing distributed for the check)."""
    import sys

    dist = sys.modules.get("distributed")
    return dist is not None and isinstance(obj, dist.Client)


def execute(
    leaves: Sequence[tuple[Any, ...]],
    combine: Callable[..., Any],
    *,
    scheduler: Any = "threads",
    workers: int | None = None,
    memory_limit: str | int | None = None,
    progress: bool | ProgressFn = False,
    split_every: int = 8,
    path: str = "",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[Any]:
    """Run the leaf tasks and tree-reduce their results with ``combine``; return the result.

    ``connect_timeout``: seconds a scheduler address gets to answer (:func:`check_address`).
    """
    check_options(scheduler, workers, memory_limit)
    name = scheduler if isinstance(scheduler, str) else None
    local = name in _LOCAL
    in_process = runs_in_process(scheduler)
    if str(path).startswith("memory://") and not in_process:
        raise ConfigError(
            f"{path} lives in this process's memory and cannot be read by other processes; "
            "use scheduler='threads' or a file:// / object-store URL"
        )
    if not leaves:
        raise ConfigError("nothing to compute")
    if name is not None and not local:
        check_address(name, connect_timeout)
    bar = _Bar(progress, len(leaves))
    try:
        if local and memory_limit is None:
            return _run_local(leaves, combine, name or "threads", workers, bar, split_every)
        return _run_distributed(
            leaves, combine, scheduler, workers, memory_limit, bar, split_every, connect_timeout
        )
    finally:
        bar.close()


def _local_get(scheduler: str) -> Callable[..., Any]:
    """The dask ``get`` function of a local scheduler name.

    Why a function, not the name: ``dask.compute(scheduler="threads")`` first imports
    dask.distributed to look for an active client (0.2-0.3 s on a cold start), which a
    local run never uses.
    """
    if scheduler in {"sync", "synchronous"}:
        from dask.local import get_sync

        return get_sync
    if scheduler in {"processes", "multiprocessing"}:
        from dask.multiprocessing import get as get_processes

        return get_processes
    from dask.threaded import get as get_threads

    return get_threads


def _run_local(
    leaves: Sequence[tuple[Any, ...]],
    combine: Callable[..., Any],
    scheduler: str,
    workers: int | None,
    bar: _Bar,
    split_every: int,
) -> Any:
    import dask
    from dask.callbacks import Callback
    from dask.delayed import delayed

    tag = uuid.uuid4().hex[:8]
    leaf_prefix = f"tdump-record-{tag}"
    # Arguments bound in a partial are opaque to dask: passed to the delayed call
    # instead, each leaf's nested plans would be walked for collections (0.1-0.2 s).
    nodes = [
        delayed(functools.partial(t[0], *t[1:]), pure=False)(dask_key_name=f"{leaf_prefix}-{j}")
        for j, t in enumerate(leaves)
    ]

    def node(children: list[Any], level: int, idx: int) -> Any:
        return delayed(combine, pure=False)(
            *children, dask_key_name=f"tdump-combine-{tag}-{level}-{idx}"
        )

    final = _tree(nodes, split_every, node)

    class _Count(Callback):  # type: ignore[misc]
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(key, str) and key.startswith(leaf_prefix):
                bar.advance()

    kwargs: dict[str, Any] = {"scheduler": _local_get(scheduler)}
    if scheduler not in {"sync", "synchronous"}:
        kwargs["num_workers"] = workers or os.cpu_count() or 1
    with _Count():
        return dask.compute(final, **kwargs)[0]


def _run_distributed(
    leaves: Sequence[tuple[Any, ...]],
    combine: Callable[..., Any],
    scheduler: Any,
    workers: int | None,
    memory_limit: str | int | None,
    bar: _Bar,
    split_every: int,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Any:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "this scheduler needs dask.distributed; install it with pip install 'tdump[distributed]'"
        ) from None
    owned: list[Any] = []
    try:
        if isinstance(scheduler, Client):
            client = scheduler
            check_workers(client)
        elif isinstance(scheduler, str) and "://" in scheduler:
            try:
                client = Client(scheduler, set_as_default=False, timeout=f"{connect_timeout}s")
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"cannot connect to the Dask scheduler at {scheduler} ({exc})"
                ) from None
            owned.append(client)
            check_workers(client)  # a cluster started elsewhere: same tdump, Python, Dask?
        else:
            cluster = LocalCluster(
                n_workers=workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                memory_limit=memory_limit or "auto",
                dashboard_address=None,
                # the scheduler's HTTP server (health, metrics) starts even without a
                # dashboard, at 8787 by default: a free port instead, so that a Dask
                # dashboard already open (Jupyter's) costs no "Port 8787 is already in use"
                scheduler_kwargs={"dashboard_address": ":0"},
                silence_logs=40,
            )
            owned.append(cluster)
            client = Client(cluster, set_as_default=False)
            owned.insert(0, client)
        tag = uuid.uuid4().hex[:8]
        func = leaves[0][0]
        cols = list(zip(*(t[1:] for t in leaves), strict=True))
        keys = [f"tdump-record-{tag}-{j}" for j in range(len(leaves))]
        futures = client.map(func, *cols, key=keys, pure=False)

        def node(children: list[Any], level: int, idx: int) -> Any:
            return client.submit(
                combine, *children, key=f"tdump-combine-{tag}-{level}-{idx}", pure=False
            )

        final = _tree(list(futures), split_every, node)
        for _ in as_completed(futures, loop=client.loop, raise_errors=False):
            bar.advance()
        del futures
        return final.result()
    finally:
        for obj in owned:
            obj.close()
