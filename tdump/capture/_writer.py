"""Background writer: host copies of one saved step -> :class:`~tdump._format.StoreWriter`.

The training thread builds a :class:`PendingRecord` (host tensors, possibly still
being filled by non-blocking device copies) and hands it to :class:`BackgroundWriter`,
whose queue is bounded: when the disk cannot keep up, training waits instead of
memory growing. The writer thread converts to numpy, casts to the storage dtype,
writes every tensor of the record and commits it last (crash consistency is the
store's: a record is visible only after its ``step`` is written).

Examples
--------
>>> import torch
>>> from tdump._format import StoreWriter, StoreReader
>>> w = BackgroundWriter(lambda: StoreWriter.create("memory://doc/w.zarr"))
>>> rec = PendingRecord("train", 0, batch_size=2)
>>> rec.add("fc.weight", torch.ones(2, 3), dims=("out_feature", "in_feature"), attrs={})
>>> w.submit(rec); w.close()
>>> StoreReader("memory://doc/w.zarr").steps("train").tolist()
[0]
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from tdump._format import StoreWriter
from tdump.capture._config import default_writer_threads

__all__ = ["BackgroundWriter", "HostBuffers", "PendingRecord", "make_compressors"]

log = logging.getLogger("tdump.capture")


@dataclass
class _Entry:
    name: str
    value: torch.Tensor
    dims: tuple[str, ...]
    attrs: dict[str, Any]


@dataclass
class PendingRecord:
    """The host copies of one saved step of one mode, waiting to be written."""

    mode: str
    step: int
    batch_size: int = -1
    entries: dict[str, _Entry] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)
    #: CUDA events recorded after all of the record's non-blocking copies (one per stream).
    events: list[Any] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: torch.Tensor,
        *,
        dims: Sequence[str],
        attrs: Mapping[str, Any],
    ) -> None:
        """Add (or replace) tensor ``name``; ``value`` must already be a private host copy.

        A non-blocking CUDA copy still in flight is waited on through :attr:`events`.
        """
        self.entries[name] = _Entry(name, value, tuple(dims), dict(attrs))

    def nbytes(self) -> int:
        """Bytes of host memory the record holds."""
        return sum(e.value.numel() * e.value.element_size() for e in self.entries.values())


class HostBuffers:
    """Host tensors the writer has finished with, reused for the next saved step's copies.

    A fresh host copy of a saved step (100+ MB for a resnet18) faults in new pages on
    every saved step, 3-4x the cost of copying into memory touched before; the writer
    hands each tensor back here once it is on disk. The pool keeps at most ``limit``
    bytes (the writer sets it to its largest record): one record's worth of memory.
    Copies of CUDA tensors go non-blocking into pinned buffers kept apart from the
    pageable ones: reusing them saves an allocation per tensor on the training thread.
    Buffers are normal tensors even when made under ``torch.inference_mode()``, so a
    validation pass in that mode does not poison the pool for the train steps after it.

    >>> pool = HostBuffers(); pool.limit = 1 << 20
    >>> a = pool.copy_of(torch.ones(2, 3)); pool.give(a)
    >>> b = pool.copy_of(torch.zeros(2, 3)); b is a, b.sum().item()
    (True, 0.0)
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype, bool], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        #: Most bytes kept free; the writer raises it to the largest record it has seen.
        self.limit = 0

    def copy_of(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A private host copy of ``t`` (cast to ``dtype`` if given).

        From a CUDA tensor the copy is non-blocking (cast on the device first, which
        halves the transfer to float16): the caller records an event to wait on.
        """
        pinned = t.device.type == "cuda"
        if pinned and dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        key = (tuple(t.shape), dtype or t.dtype, pinned)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
            if buf is not None:
                self._bytes -= buf.nbytes
        if buf is None:
            buf = _normal_empty(key[0], key[1], pinned)
        return buf.copy_(t, non_blocking=pinned)

    def give(self, t: torch.Tensor) -> None:
        """Return ``t`` (no longer read by anyone) for reuse.

        Inference tensors (a reduction or clone made under ``torch.inference_mode()``)
        are not kept: outside inference mode nothing may be copied into them.
        """
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_inference():
            return
        key = (tuple(t.shape), t.dtype, t.is_pinned())
        with self._lock:
            if self._bytes + t.nbytes <= self.limit:
                self._free.setdefault(key, []).append(t)
                self._bytes += t.nbytes


def _normal_empty(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An empty tensor that is never an inference tensor.

    Made in inference mode (a validation pass under ``torch.inference_mode()``) it
    would be one, and no later copy outside that mode may write into it. The context
    manager is entered only then: a Ctrl-C landing between its ``__enter__`` and
    ``__exit__`` would leave the training thread's autograd mode switched.
    """
    if not torch.is_inference_mode_enabled():
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def make_compressors(
    spec: str, collection: str | None = None, storage_dtype: str | None = None
) -> Any:
    """Zarr v3 compressors for a spec and the tensor's collection.

    Specs: ``auto`` (per collection, :data:`~tdump.capture.AUTO_COMPRESSION`; else
    none; the writer then stores a tensor that codec does not shrink uncompressed,
    :func:`shrinks`), ``zstd[:level]``, ``lz4[:level]``, ``lz4-noshuffle[:level]``,
    ``zstd-plain[:level]``, ``none``. ``zstd`` and ``lz4`` are Blosc with byte shuffle
    (zstd level 1, lz4 level 5 by default); ``zstd-plain`` is the bare zstd codec.
    With ``storage_dtype="bfloat16"`` (float32 whose two low bytes are zero) ``auto``
    is LZ4 with byte shuffle for every collection: the zero bytes become whole zero
    planes, which is where that option's halving of the bytes comes from.

    >>> make_compressors("none") is None, make_compressors("auto", "weights") is None
    (True, True)
    >>> make_compressors("auto", "activations")[0].cname.value
    'lz4'
    >>> make_compressors("auto", "weights", "bfloat16")[0].shuffle.value
    'shuffle'
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    from tdump.capture._config import AUTO_COMPRESSION

    if spec == "auto":
        spec = (
            "lz4" if storage_dtype == "bfloat16" else AUTO_COMPRESSION.get(collection or "", "none")
        )
    name, _, level = spec.partition(":")
    if name == "none":
        return None
    if name == "zstd-plain":
        return (ZstdCodec(level=int(level or 1)),)
    cname: Literal["lz4", "zstd"] = "lz4" if name.startswith("lz4") else "zstd"
    clevel = int(level or (5 if cname == "lz4" else 1))
    shuffle: Literal["noshuffle", "shuffle"] = (
        "noshuffle" if name.endswith("noshuffle") else "shuffle"
    )
    return (BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle),)


#: ``compression="auto"`` stores a tensor uncompressed when its codec does not shrink its
#: first record by at least this factor. Dense gradients (those of resnet18's block ReLU
#: outputs) encode to 1.00x: the codec's pass over them, and the decode at ranking, buy
#: nothing. Incompressible means no bytes are lost by storing them raw.
WORTH_COMPRESSING = 1.01


def shrinks(compressors: Sequence[Any], value: np.ndarray) -> bool:
    """Whether ``compressors`` (as :func:`make_compressors` gives them) shrink ``value``.

    By :data:`WORTH_COMPRESSING` or more, in a trial encode of ``value`` (one record).
    A codec this cannot try counts as shrinking (nothing changes).

    >>> lz4 = make_compressors("auto", "activation_gradients")
    >>> rng = np.random.default_rng(0)
    >>> shrinks(lz4, rng.standard_normal((8, 64)).astype("f4"))   # dense: stored raw
    False
    >>> shrinks(lz4, np.maximum(rng.standard_normal((8, 64)), 0).astype("f4"))  # ReLU zeros
    True
    """
    from zarr.codecs import BytesCodec

    from tdump._chunks import numcodecs_codec

    found = numcodecs_codec([BytesCodec(), *compressors])
    if found is None or found[0] is None:
        return True
    data = np.ascontiguousarray(value)
    return data.nbytes >= WORTH_COMPRESSING * len(found[0].encode(data))


#: Source dtypes whose values, widened to float32, leave its low mantissa bits zero.
_NARROW = frozenset({"float16", "bfloat16"})


def _to_numpy(value: torch.Tensor, storage_dtype: str | None) -> tuple[np.ndarray, Any]:
    """Host tensor -> numpy in the storage dtype; returns ``(array, zarr dtype or None)``."""
    t = value
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: store float32 whose low 16 bits are zero (compressed away).
        return t.float().numpy(), None
    if storage_dtype == "float16" and t.is_floating_point() and t.dtype != torch.float16:
        t = t.half()
    if storage_dtype == "bfloat16" and t.is_floating_point():
        return t.to(torch.bfloat16).float().numpy(), None
    return t.numpy(), None


class BackgroundWriter:
    """Owns the store on a daemon thread; :meth:`submit` blocks when ``queue_size`` records wait.

    Parameters
    ----------
    open_store
        Called once, on the first record, in the caller's thread (so bad paths fail
        where the user can see them) to create the :class:`StoreWriter`.
    compression, storage_dtype
        As in :class:`~tdump.capture.HookConfig`.
    queue_size
        Records that may wait; more blocks the training thread (back-pressure).
    threads
        Threads encoding and writing the tensors of a record to local files (``0``:
        :func:`~tdump.capture.default_writer_threads`). With more than one, the writer
        thread hands each tensor to a pool of that many and commits the record once
        all of them are written.
    """

    def __init__(
        self,
        open_store: Callable[[], StoreWriter],
        *,
        compression: str = "auto",
        storage_dtype: str | None = None,
        queue_size: int = 2,
        threads: int = 0,
    ) -> None:
        self._open_store = open_store
        self._threads = threads or default_writer_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._store: StoreWriter | None = None
        self._compression = compression
        # per collection, and whether the tensor is bfloat16
        self._compressors: dict[tuple[str | None, bool], Any] = {}
        self._tensor_codecs: dict[tuple[str, str], Any] = {}  # "auto": per tensor, once
        self._storage_dtype = storage_dtype
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        #: Host buffers of written records, for the training thread's next copies.
        self.buffers = HostBuffers()
        self.error: BaseException | None = None
        self.closed = False
        #: Running totals, for benchmarks and summaries.
        self.stats = {"records": 0, "bytes_raw": 0, "write_seconds": 0.0}
        self.committed: dict[str, int] = {}

    @property
    def store(self) -> StoreWriter | None:
        """The store writer, once the first record opened it."""
        return self._store

    def _start(self) -> None:
        if self._thread is None:
            self._store = self._open_store()
            self._thread = threading.Thread(target=self._run, name="tdump-writer", daemon=True)
            self._thread.start()

    def submit(self, record: PendingRecord) -> None:
        """Queue ``record`` for writing (blocks while the queue is full)."""
        self._put(("record", record))

    def update_meta(self, **fields: Any) -> None:
        """Queue a merge of ``fields`` into the rank group's attributes."""
        self._put(("meta", fields))

    def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if self._thread is None or self.closed:
            return
        done = threading.Event()
        self._put(("flush", done))
        while not done.wait(0.5):
            if not self._alive():
                break
        self.raise_error()

    def _put(self, item: tuple[str, Any]) -> None:
        if self.closed:
            return
        self.raise_error()
        self._start()
        while True:  # a full queue waits for the writer, never for a writer that died
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._alive():
                    self.raise_error()
                    return

    def _alive(self) -> bool:
        """Whether the writer thread still runs; records why not in ``error`` when it died."""
        if self._thread is not None and not self._thread.is_alive():
            if self.error is None:
                self.error = RuntimeError("the tdump writer thread stopped unexpectedly")
            return False
        return True

    def raise_error(self) -> None:
        """Re-raise an error the writer thread hit (once)."""
        if self.error is not None:
            err, self.error = self.error, None
            self.closed = True
            raise err

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, stop the thread, re-raise a writer error if there was one.

        With ``timeout`` (seconds; used after SIGTERM/SIGINT and at exit) give up
        waiting after that long: records still queued then are not committed, which
        one log line says; the store keeps every record committed before.
        """
        if self.closed:
            self.raise_error()
            return
        self.closed = True
        if self._thread is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._alive():
                try:
                    self._queue.put(("stop", None), timeout=0.5)
                    break
                except queue.Full:
                    if deadline is not None and time.monotonic() > deadline:
                        break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._thread.join(left)
            if self._thread.is_alive():
                log.error(
                    "tdump: the writer did not finish within %.0f s; %d queued record(s) "
                    "not committed (the dump keeps every record committed before)",
                    timeout or 0.0,
                    self._queue.qsize(),
                )
                return
        self.raise_error()

    # -- writer thread
    def _run(self) -> None:
        if self._threads > 1:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tdump-encode")
        try:
            self._serve()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _serve(self) -> None:
        while True:
            kind, item = self._queue.get()
            if kind == "stop":
                return
            if kind == "flush":
                item.set()
                continue
            if self.error is not None:
                continue  # drain without writing after a failure
            try:
                if kind == "meta":
                    assert self._store is not None
                    self._store.update_meta(**item)
                else:
                    self._write(item)
            except BaseException as exc:
                self.error = exc

    def _write(self, rec: PendingRecord) -> None:
        store = self._store
        assert store is not None
        t0 = time.perf_counter()
        index = store.next_record(rec.mode)
        pending: list[Future[None]] = []
        try:
            raw = self._write_entries(store, rec, index, pending)
        finally:
            # every write ends before the record's buffers go back or an error is raised
            done, _ = wait(pending)
        for f in done:
            f.result()
        store.commit(
            rec.mode, index, step=rec.step, batch_size=rec.batch_size, wall_time=rec.wall_time
        )
        self.buffers.limit = max(self.buffers.limit, rec.nbytes())
        for e in rec.entries.values():
            self.buffers.give(e.value)
        self.committed[rec.mode] = self.committed.get(rec.mode, 0) + 1
        self.stats["records"] += 1
        self.stats["bytes_raw"] += raw
        self.stats["write_seconds"] += time.perf_counter() - t0

    def _write_entries(
        self, store: StoreWriter, rec: PendingRecord, index: int, pending: list[Future[None]]
    ) -> int:
        """Write (or hand to the pool) each tensor of ``rec``; returns the raw bytes."""
        raw = 0
        for event in rec.events:
            event.synchronize()
        for e in rec.entries.values():
            coll = e.attrs.get("collection")
            # one number per step saves nothing in half precision, and 2**16 (a loss
            # scale) or a large step count would not even fit float16
            storage = None if coll == "scalars" else self._storage_dtype
            arr, _ = _to_numpy(e.value, storage)
            raw += arr.nbytes
            attrs = dict(e.attrs)
            attrs.setdefault("source_dtype", str(e.value.dtype).replace("torch.", ""))
            if storage is not None and e.value.is_floating_point():
                attrs["storage_dtype"] = storage
            # a bfloat16 tensor (autocast) is stored as float32 with two zero bytes per
            # value, as storage_dtype="bfloat16" stores any, and a float16 gradient divided
            # by the loss scale as float32 with 13 zero low bits: the byte-shuffled codec
            # makes those bits whole zero planes
            narrow = arr.dtype == np.float32 and attrs["source_dtype"] in _NARROW
            if (coll, narrow) not in self._compressors:
                self._compressors[coll, narrow] = make_compressors(
                    self._compression, coll, "bfloat16" if narrow else storage
                )
            compressors = self._compressors[coll, narrow]
            if compressors is not None and self._compression == "auto":
                key = (rec.mode, e.name)
                if key not in self._tensor_codecs:
                    self._tensor_codecs[key] = compressors if shrinks(compressors, arr) else None
                compressors = self._tensor_codecs[key]
            future = store.write_tensor(
                rec.mode,
                index,
                e.name,
                arr,
                dims=e.dims,
                attrs=attrs,
                compressors=compressors,
                executor=self._pool,
            )
            if future is not None:
                pending.append(future)
        return raw
