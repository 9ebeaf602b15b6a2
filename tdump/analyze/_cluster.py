"""Check that a Dask cluster someone else started can run tdump's ranking tasks.

Ranking ships tdump's own functions to the workers by reference, so every worker needs
tdump importable, at the client's version, under the same Python and Dask. Without this
check a worker lacking tdump would fail every task sent to it deep inside Dask, and a
worker at another tdump version could read the store differently. Workers joining after
the check are not checked; a cluster with no worker yet is not checked at all.

Examples
--------
>>> from distributed import Client, LocalCluster                     # doctest: +SKIP
>>> with LocalCluster(n_workers=1, processes=False) as c, Client(c) as client:
...     check_workers(client)                                          # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import Any

from tdump._version import __version__
from tdump.errors import ConfigError

__all__ = ["check_workers", "local_versions"]


def local_versions() -> dict[str, str]:
    """This process's versions of what must match on the workers."""
    import dask
    import distributed

    return {
        "tdump": __version__,
        "python": "{}.{}".format(*sys.version_info[:2]),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def check_workers(client: Any) -> None:
    """Raise :class:`ConfigError` (one line) unless every worker matches this client.

    Checked: tdump importable, and tdump, Python (major.minor), dask and distributed
    at this process's versions; dask and distributed on the scheduler too.
    """

    def probe() -> dict[str, str]:  # defined here so that cloudpickle ships it by value
        import sys

        import dask
        import distributed

        found = {
            "python": "{}.{}".format(*sys.version_info[:2]),
            "dask": dask.__version__,
            "distributed": distributed.__version__,
        }
        try:
            import tdump
        except Exception as exc:  # ImportError, or a broken install
            found["tdump-error"] = f"{type(exc).__name__}: {exc}"
        else:
            found["tdump"] = tdump.__version__
        return found

    here = local_versions()
    address = getattr(client, "scheduler", None)
    where = getattr(address, "address", None) or "the scheduler"
    workers: dict[str, dict[str, str]] = client.run(probe)
    missing = {w: v["tdump-error"] for w, v in workers.items() if "tdump-error" in v}
    if missing:
        worker, why = sorted(missing.items())[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(
            f"tdump is not importable on Dask worker {worker}{more} of {where} ({why}); "
            f"install tdump {__version__} (with the extras your dump's URL needs, e.g. "
            "tdump[s3]) in every worker's environment"
        )
    try:
        scheduler = client.get_versions()["scheduler"]["packages"]
        workers = {
            **workers,
            f"scheduler {where}": {k: str(scheduler.get(k)) for k in ("dask", "distributed")},
        }
    except Exception:  # an old or unusual scheduler: the workers' check still stands
        pass
    for package, mine in here.items():
        other = {w: v[package] for w, v in workers.items() if package in v and v[package] != mine}
        if other:
            node, theirs = sorted(other.items())[0]
            more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
            raise ConfigError(
                f"Dask cluster at {where} does not match this client: {package} {mine} here, "
                f"{theirs} on {node}{more}; install the same {package} version on the client, "
                "the scheduler and every worker"
            )
