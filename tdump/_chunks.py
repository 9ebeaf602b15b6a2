"""Whole-record chunk files of a local tensor array, read and written without zarr's machinery.

A tensor array of the store (docs/FORMAT.md) has one chunk per record. On a local disk
with the codecs tdump writes (``bytes``, then at most one Blosc or Zstd compressor), a
record is one file that numcodecs can encode or decode in one call. Going straight to
that file skips zarr's per-chunk asyncio pipeline, which matters twice:

* the capture writer thread then holds the GIL for microseconds per chunk instead of
  milliseconds, so the training thread is not starved while a saved step is written;
* rankers decode into reused buffers (no fresh pages per chunk).

The files are exactly what zarr writes and reads (same keys, codecs, atomic
temporary-file-and-rename writes); any other array gets ``None`` from
:func:`chunk_files` and goes through zarr.

Examples
--------
>>> import numpy as np, tempfile, os, zarr
>>> root = zarr.open_group(os.path.join(tempfile.mkdtemp(), "d.zarr"), mode="w")
>>> arr = root.create_array("t", shape=(4, 3), chunks=(1, 3), dtype="f4", fill_value=np.nan)
>>> files = chunk_files(arr)
>>> files.write(1, np.arange(3, dtype="f4"))
>>> arr[1].tolist(), files.read(1).tolist(), files.read(2).tolist()
([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [nan, nan, nan])
"""

from __future__ import annotations

import mmap
import os
import uuid
from typing import Any, Literal

import numpy as np
import zarr

from tdump.errors import CorruptStoreError

__all__ = [
    "CHUNK_KEY_ENCODING",
    "ChunkFiles",
    "Scratch",
    "chunk_files",
    "chunk_prefix",
    "numcodecs_codec",
]

#: Tensor arrays name chunk files ``c.<record>.0.0...``, flat in the array's folder: one
#: file per record and no folder to create per record and tensor (creating folders is
#: the costliest part of writing a record on many file systems).
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}

#: A record's bytes are mapped with their page-table entries made at once: faulting
#: them in page by page cost more than the copy the mapping saves. ``None`` (Windows):
#: records are read with ``pread`` instead.
_MAP_FLAGS: int | None = (
    mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0) if hasattr(mmap, "MAP_SHARED") else None
)


def chunk_prefix(arr: zarr.Array) -> tuple[str, str]:
    """``(prefix, separator)`` of ``arr``'s chunk keys in the store: ``("<path>/c.", ".")``."""
    sep = getattr(arr.metadata.chunk_key_encoding, "separator", "/")  # type: ignore[union-attr]
    sep = getattr(sep, "value", sep)
    return f"{arr.path}/c{sep}", str(sep)


class Scratch:
    """Reusable buffers for :meth:`ChunkFiles.read` (one per thread and array)."""

    def __init__(self) -> None:
        self.raw = bytearray()  # the file's bytes
        self.value: np.ndarray | None = None  # the decoded record


class ChunkFiles:
    """The record files of one array; build with :func:`chunk_files`."""

    def __init__(self, arr: zarr.Array, directory: str, codec: Any, dtype: np.dtype) -> None:
        self.arr = arr
        self.directory = directory
        self.codec = codec  # a numcodecs codec, or None for uncompressed chunks
        self.dtype = dtype  # the stored byte order
        self.row_shape: tuple[int, ...] = tuple(arr.shape[1:])
        self._zeros = (0,) * len(self.row_shape)
        self._made: set[str] = set()
        self._blosc_sizes = _blosc_header_reader(codec)

    def path(self, index: int) -> str:
        """File of record ``index``."""
        key = self.arr.metadata.encode_chunk_key((index, *self._zeros))
        return os.path.join(self.directory, key)

    def write(self, index: int, value: np.ndarray) -> None:
        """Write record ``index`` (shape ``row_shape``) atomically: temporary file, then rename."""
        encoded = self._encode(value)
        path = self.path(index)
        folder = os.path.dirname(path)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # readers skip *.partial (docs/FORMAT.md)
        try:
            with open(tmp, "wb", buffering=0) as fh:
                view = memoryview(encoded)
                while view.nbytes:
                    view = view[fh.write(view) :]
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _encode(self, value: np.ndarray) -> memoryview:
        """The stored bytes of one record (shape ``row_shape``)."""
        if value.shape != self.row_shape:
            raise ValueError(f"record of shape {value.shape}, array rows are {self.row_shape}")
        data = np.require(value, dtype=self.dtype, requirements="C")  # keeps 0-d scalars 0-d
        encoded = self.codec.encode(data) if self.codec is not None else data.data.cast("B")
        return memoryview(encoded).cast("B")

    def _locate(self, fd: int, index: int, step: int | None) -> tuple[int, int] | None:
        """``(offset, nbytes)`` of record ``index``'s bytes in open file ``fd``; ``None``: not written."""
        return 0, os.fstat(fd).st_size

    def _short(self, size: int) -> str:
        """What a file that ends before the record's ``size`` bytes is (for the error)."""
        return f"is shorter than its size ({size} bytes)"

    def prefetch(self, index: int) -> None:
        """Ask the OS to start reading record ``index`` in the background (a hint only)."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.path(index), os.O_RDONLY)
        except OSError:
            return
        try:
            where = self._locate(fd, index, None)
            if where is not None:
                os.posix_fadvise(fd, where[0], where[1], os.POSIX_FADV_WILLNEED)
        except Exception:  # a hint: the read reports damage
            pass
        finally:
            os.close(fd)

    def read(
        self, index: int, scratch: Scratch | None = None, *, step: int | None = None
    ) -> np.ndarray:
        """Record ``index``; the fill value where it was never written.

        With ``scratch`` the file is read and decoded into its buffers (grown as
        needed) and the result is a view of them, valid until the next read into the
        same scratch; without, the result is a fresh array.

        Raises :class:`~tdump.errors.CorruptStoreError` when the file does not decode
        to exactly one record (empty, truncated, garbage, another array's chunk):
        never stale scratch contents or a misshapen array. ``step`` only labels
        that message.
        """
        try:
            fd = os.open(self.path(index), os.O_RDONLY)
        except FileNotFoundError:
            return np.full(self.row_shape, self.arr.fill_value, dtype=self.arr.dtype)
        out = None
        view: memoryview | None = None  # of the record's mapped bytes
        try:
            where = self._locate(fd, index, step)
            if where is None:
                return np.full(self.row_shape, self.arr.fill_value, dtype=self.arr.dtype)
            offset, size = where
            if scratch is not None and scratch.value is None:
                scratch.value = np.empty(self.row_shape, dtype=self.dtype)
            out = scratch.value if scratch is not None else None
            if _MAP_FLAGS is not None and self.codec is not None and size:
                # decode straight from the page cache: copying the compressed bytes out
                # first cost about 0.2 s of CPU per compressed GB (2.2 GB ranking dump);
                # _locate has checked that the record lies inside the file
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                view = memoryview(
                    mmap.mmap(
                        fd,
                        offset + size - start,
                        flags=_MAP_FLAGS,
                        prot=mmap.PROT_READ,
                        offset=start,
                    )
                )
                data: Any = view[offset - start :]
            elif scratch is not None:
                if len(scratch.raw) < size:
                    scratch.raw = bytearray(size)
                data = memoryview(scratch.raw)[:size]
                filled = 0
                while filled < size:
                    n = os.preadv(fd, [data[filled:]], offset + filled)
                    if not n:
                        raise self._corrupt(index, step, self._short(size))
                    filled += n
            else:
                data = os.pread(fd, size, offset)
                if len(data) != size:
                    raise self._corrupt(index, step, self._short(size))
        finally:
            os.close(fd)
        expected = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        try:
            data = self._decode(data, out, expected, index, step)
        finally:
            if view is not None:
                _unmap(view)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape)

    def _decode(
        self, data: Any, out: np.ndarray | None, expected: int, index: int, step: int | None
    ) -> Any:
        """Decode one file's bytes, checking they hold exactly ``expected`` bytes of values."""
        size = len(data)
        codec = self.codec
        if codec is None:
            if size != expected:
                raise self._corrupt(index, step, f"holds {size} bytes, a record is {expected}")
            return data
        if size == 0:
            raise self._corrupt(index, step, f"is empty, a record is {expected} bytes")
        if self._blosc_sizes is not None:
            # the header says what the buffer decodes to: a shorter record would leave
            # the rest of a reused scratch buffer holding the previous record's values
            nbytes, cbytes, _ = self._blosc_sizes(data)
            if nbytes != expected or cbytes != size:
                raise self._corrupt(
                    index,
                    step,
                    f"has an invalid compression header (the file holds {size} bytes, "
                    f"its header says {cbytes} compressed and {nbytes} decoded; "
                    f"a record is {expected} bytes)",
                )
        target, out = out, (out if self._blosc_sizes is not None else None)
        # zstd (no header read here): decode to a fresh buffer whose length is checked
        try:
            decoded = codec.decode(data, out=out)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on bad input
            raise self._corrupt(index, step, f"is garbage ({exc})") from None
        n = memoryview(decoded).nbytes
        if n != expected:
            raise self._corrupt(index, step, f"decodes to {n} bytes, a record is {expected}")
        if target is not None and out is None:  # keep the scratch contract: results live there
            np.copyto(target, np.frombuffer(decoded, dtype=self.dtype).reshape(self.row_shape))
            return target
        return decoded

    #: What a user can do about a damaged record (the end of its error message).
    _REMEDY = "re-record it, or delete that file to treat the record as not saved"

    def _where(self, index: int, what: str) -> str:
        """Which file holds record ``index`` and what is wrong with it (for the error)."""
        return f"chunk file {self.path(index)} {what}"

    def _corrupt(self, index: int, step: int | None, what: str) -> CorruptStoreError:
        tensor = self.arr.path.rsplit("/", 1)[-1]
        at = f"record {index}" + (f" (step {step})" if step is not None else "")
        return CorruptStoreError(
            f"tensor {tensor!r}, {at} does not decode: {self._where(index, what)}; "
            f"the dump is damaged: {self._REMEDY}"
        )


def _unmap(view: memoryview) -> None:
    """Unmap the mapping ``view`` shows now, or, while a slice of it is alive, when the last goes."""
    mapped: Any = view.obj
    try:
        view.release()
        mapped.close()
    except BufferError:  # an error's traceback still holds a slice: garbage collection unmaps
        pass


def _blosc_header_reader(codec: Any) -> Any:
    """``f(buffer) -> (nbytes, cbytes, blocksize)`` from a Blosc header, or ``None``.

    Without it (not Blosc, or numcodecs moved the function) chunks decode into a fresh
    buffer whose length is checked instead.
    """
    try:
        import numcodecs
        from numcodecs import blosc
    except ImportError:  # pragma: no cover - numcodecs comes with zarr
        return None
    if not isinstance(codec, numcodecs.Blosc):
        return None
    return getattr(blosc, "cbuffer_sizes", None) or getattr(blosc, "_cbuffer_sizes", None)


def numcodecs_codec(codecs: list[Any]) -> tuple[Any, Literal["<", ">"]] | None:
    """``(numcodecs codec or None, "<" or ">")`` for ``bytes`` [+ one Blosc/Zstd], else ``None``."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    endian = getattr(codecs[0].endian, "value", "little")
    order: Literal["<", ">"] = "<" if endian == "little" else ">"
    codec: Any = None
    if len(codecs) == 2:
        comp = codecs[1]
        if isinstance(comp, BloscCodec):
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[
                getattr(comp.shuffle, "value", "shuffle")
            ]
            codec = numcodecs.Blosc(
                cname=getattr(comp.cname, "value", "zstd"),
                clevel=comp.clevel,
                shuffle=shuffle,
                blocksize=comp.blocksize,
            )
        elif isinstance(comp, ZstdCodec):
            codec = numcodecs.Zstd(level=comp.level, checksum=comp.checksum)
        else:
            return None
    return codec, order


def chunk_files(arr: zarr.Array) -> ChunkFiles | None:
    """Direct record files for ``arr`` if it is a local tdump tensor array, else ``None``.

    Format 1 arrays (one chunk file per record) get a :class:`ChunkFiles`, format 2
    arrays (records in shard files) a :class:`~tdump._shards.ShardFiles`.
    """
    try:
        from zarr.storage import LocalStore

        from tdump._shards import shard_files, shard_records

        if shard_records(arr) is not None:
            return shard_files(arr)
        if not isinstance(arr.store, LocalStore) or tuple(arr.chunks) != (1, *arr.shape[1:]):
            return None
        found = numcodecs_codec(list(arr.metadata.codecs))  # type: ignore[union-attr]
        if found is None:
            return None
        codec, order = found
        directory = os.path.join(str(arr.store.root), arr.path)
        return ChunkFiles(arr, directory, codec, np.dtype(arr.dtype).newbyteorder(order))
    except Exception:  # any surprise (a zarr change, odd metadata): let zarr do it
        return None
