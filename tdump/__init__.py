"""tdump: tensor capture out of the training loop.

Record regex-selected tensors from a PyTorch run into a Zarr store, rank conv
filters from that store with Dask on CPUs, and rewrite checkpoints without the
weakest filters. The three stages talk only through documented files
(``docs/FORMAT.md``).

Heavy modules (torch, dask, xarray) load on first use, so ``import tdump`` is cheap.

Examples
--------
>>> import tdump
>>> tdump.__version__
'0.1.0'
"""

from __future__ import annotations

import importlib
from typing import Any

from tdump._version import __version__
from tdump.errors import TdumpError

__all__ = [
    "Hook",
    "TdumpError",
    "Trial",
    "__version__",
    "load",
    "open_dump",
    "prune",
    "rank",
    "report",
    "save",
]

_LAZY = {
    "Hook": "tdump.capture",
    "open_dump": "tdump.analyze",
    "Trial": "tdump.analyze",
    "rank": "tdump.analyze",
    "prune": "tdump.surgery",
    "load": "tdump.surgery",
    "report": "tdump.capture._report",
}


def save(model: Any, path: Any, *, arch: Any = None, arch_kwargs: Any = None) -> None:
    """Write ``model`` as a tdump checkpoint, argument order as ``torch.save(obj, path)``.

    A model from :func:`tdump.load` or :func:`tdump.prune` knows its architecture;
    one built in Python needs ``arch`` (e.g. ``"torchvision.models.resnet18"``) and
    ``arch_kwargs``. Read it back with ``tdump.load(path)`` (``tdump.surgery.save``
    and ``tdump.surgery.load``, docs/surgery.md).

    Examples
    --------
    >>> import torchvision, tdump
    >>> tdump.save(torchvision.models.resnet18(), "ckpt.pt", arch="resnet18")  # doctest: +SKIP
    >>> model = tdump.load("ckpt.pt")  # doctest: +SKIP
    """
    import os

    from tdump.surgery import save as _save

    if isinstance(model, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
        from tdump.errors import ConfigError

        raise ConfigError(
            "tdump.save takes (model, path), as torch.save does; tdump.surgery.save takes "
            "(path, model): swap the arguments"
        )
    _save(path, model, arch=arch, arch_kwargs=arch_kwargs)


#: The stages, importable as attributes after a plain ``import tdump`` (``tdump.analyze.Trial``).
_STAGES = ("analyze", "capture", "loop", "surgery")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _STAGES:
        return importlib.import_module(f"tdump.{name}")
    raise AttributeError(f"module 'tdump' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too (tab completion in Jupyter calls dir()), not the typing helpers
    from tdump._lazy import public_dir

    return public_dir([*__all__, *_STAGES], globals())
