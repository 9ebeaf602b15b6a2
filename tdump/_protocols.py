"""Fail early, in one line, when a URL's fsspec protocol has no implementation installed.

fsspec imports a protocol's package (``s3fs`` for ``s3://``) only when a filesystem is
first made, and then raises a bare ``ImportError`` from deep inside Zarr. Every entry
point that takes a store URL (the writer, every reader, ``tdump record``) calls
:func:`require_protocol` first, so the user reads which package is missing and the
``pip install`` line that adds it.

Examples
--------
>>> require_protocol("run.zarr")            # a local path needs nothing
>>> require_protocol("memory://doc/x.zarr") # built into fsspec
"""

from __future__ import annotations

import os

from tdump.errors import MissingDependencyError

__all__ = ["EXTRAS", "require_protocol"]

#: protocol -> tdump extra that installs its fsspec implementation
EXTRAS: dict[str, str] = {"s3": "s3", "s3a": "s3"}


def require_protocol(url: str | os.PathLike[str]) -> None:
    """Raise :class:`MissingDependencyError` if ``url``'s protocol cannot be imported.

    Chained URLs (``simplecache::s3://...``) check every protocol in the chain. Unknown
    protocols are left to fsspec, whose own error names them.
    """
    text = os.fspath(url)
    if "://" not in text:
        return
    from fsspec.registry import get_filesystem_class, known_implementations

    for part in text.split("::"):
        if "://" not in part:
            continue
        protocol = part.split("://", 1)[0]
        try:
            get_filesystem_class(protocol)
        except ImportError:
            impl = known_implementations.get(protocol, {})
            package = str(impl.get("class", protocol)).split(".", 1)[0]
            extra = EXTRAS.get(protocol)
            fix = f"pip install 'tdump[{extra}]'" if extra else f"pip install {package}"
            raise MissingDependencyError(
                f"{protocol}:// needs the {package} package, which is not installed; {fix}"
            ) from None
        except ValueError:  # unknown protocol: the caller's own error path says so
            return
