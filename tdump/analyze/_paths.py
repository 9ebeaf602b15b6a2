"""Where a ranks file may be written: checked before ranking, so a bad ``-o`` fails at once.

Examples
--------
>>> beside_dump("runs/d1.zarr/", "ranks.parquet")
'runs/d1.ranks.parquet'
"""

from __future__ import annotations

import os
import uuid

from tdump.analyze._ranks_io import not_a_ranks_file
from tdump.errors import ConfigError

__all__ = ["beside_dump", "check_output_path", "is_inside", "same_path"]


def check_output_path(
    path: str | os.PathLike[str],
    *,
    dump: str | os.PathLike[str] | None = None,
    only_ranks: bool = False,
) -> str:
    """Check that a ranks file can be written at local ``path``; return ``path``.

    Called before ranking, so a bad ``--out`` fails at once rather than after the
    work. URLs (``s3://`` ...) are not checked. A file already at ``path`` is
    replaced atomically; with ``only_ranks`` (``tdump rank``) only if it is a ranks
    file or empty, so a checkpoint given as ``-o`` by mistake is not lost. ``path``
    may be neither the ``dump`` being ranked nor inside it: ``tdump record
    --overwrite`` deletes the folder, and the ranks with it.

    Raises
    ------
    ConfigError
        ``path`` is a directory, the dump or inside it, its folder does not exist, is
        not a folder, or is not writable, or (``only_ranks``) it holds something else.

    Examples
    --------
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> check_output_path(os.path.join(folder, "ranks.parquet")).endswith("ranks.parquet")
    True
    >>> check_output_path(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tdump.errors.ConfigError: ... is a directory; give a file name, e.g. .../ranks.parquet
    """
    path = os.fspath(path)
    if "://" in path:
        return path
    local_dump = os.fspath(dump) if dump is not None and "://" not in os.fspath(dump) else None
    if local_dump is not None and (same_path(path, local_dump) or is_inside(path, local_dump)):
        where = (
            "is the dump being ranked"
            if same_path(path, local_dump)
            else f"is inside the dump {local_dump}"
        )
        raise ConfigError(
            f"{path} {where}; write the ranks beside it, e.g. -o "
            f"{beside_dump(local_dump, 'ranks.parquet')} (recording the dump again deletes "
            "what is inside it)"
        )
    if os.path.isdir(path):
        # a dump (zarr.json at its root): inside it is the wrong place to suggest
        if any(os.path.exists(os.path.join(path, n)) for n in ("zarr.json", ".zgroup")):
            raise ConfigError(
                f"{path} is a dump, not a file; write the ranks beside it, e.g. -o "
                f"{beside_dump(path, 'ranks.parquet')}"
            )
        raise ConfigError(
            f"{path} is a directory; give a file name, e.g. {os.path.join(path, 'ranks.parquet')}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise ConfigError(
            f"cannot write {path}: folder {folder} does not exist; create it or choose another --out"
        )
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path}: {folder} is not a folder; choose another --out")
    if only_ranks and os.path.isfile(path) and os.path.getsize(path) > 0:
        what = not_a_ranks_file(path)
        if what is not None:
            other = os.path.join(os.path.dirname(path), "ranks.parquet")
            suggestion = other if not os.path.exists(other) else "a new file name"
            raise ConfigError(
                f"{path} exists and is not a ranks file ({what}); tdump rank replaces only "
                f"ranks files: choose another -o (e.g. {suggestion}) or move {path} away first"
            )
    probe = os.path.join(folder, f".tdump-probe-{uuid.uuid4().hex[:12]}.partial")
    try:  # os.access misses read-only mounts and ACLs: try it
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path}: folder {folder} is not writable ({exc.strerror or exc}); "
            "choose another --out"
        ) from None
    return path


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether local paths ``a`` and ``b`` name one file or folder.

    ``os.path.samefile`` when both exist (it sees hard links and symlinks), else
    the same resolved path (a file not written yet has no inode to compare).

    >>> same_path("a/../b.pt", "b.pt"), is_inside("d.zarr/r.parquet", "d.zarr")
    (True, True)
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether local ``path`` lies under ``folder`` (symlinks resolved; ``folder`` itself is not)."""
    inner, outer = os.path.realpath(path), os.path.realpath(folder)
    return inner != outer and os.path.commonpath([inner, outer]) == outer


def beside_dump(dump: str | os.PathLike[str], suffix: str) -> str:
    """A file name beside ``dump`` (in its parent folder): ``d1.zarr`` -> ``d1.<suffix>``.

    Files inside a dump are lost when it is recorded again (``tdump record
    --overwrite`` deletes the folder), so suggestions point beside it.

    >>> beside_dump("runs/d1.zarr/", "ranks.parquet")
    'runs/d1.ranks.parquet'
    """
    text = os.fspath(dump).rstrip("/" + os.sep) or os.fspath(dump)
    name = os.path.basename(text)
    stem = name[: -len(".zarr")] if name.endswith(".zarr") and len(name) > 5 else name
    return os.path.join(os.path.dirname(text), f"{stem}.{suffix}")
