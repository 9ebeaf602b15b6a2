"""``dir()`` of a package whose public names load on first use (PEP 562).

A package that imports torch or xarray only when ``tdump.Hook`` or ``tdump.open_dump``
is first read has those names outside its namespace until then, so ``dir()`` (and the
tab completion of IPython and Jupyter, which calls it) would not list them, while it
would list the typing helpers the ``__init__`` imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["public_dir"]


def public_dir(names: Iterable[str], namespace: Mapping[str, Any]) -> list[str]:
    """``names`` (the package's ``__all__``), its dunders and its loaded public submodules, sorted.

    Examples
    --------
    >>> import typing
    >>> ns = {"__name__": "pkg", "__doc__": "", "Any": typing.Any, "helper": len,
    ...       "sub": ModuleType("pkg.sub"), "_impl": ModuleType("pkg._impl"), "typing": typing}
    >>> public_dir(["Hook", "load"], ns)
    ['Hook', '__doc__', '__name__', 'load', 'sub']
    """
    package = str(namespace.get("__name__", ""))
    found = set(names)
    for key, value in namespace.items():
        public_module = (
            isinstance(value, ModuleType)
            and value.__name__.startswith(package + ".")
            and not key.startswith("_")
        )
        if key.startswith("__") or public_module:
            found.add(key)
    return sorted(found)
