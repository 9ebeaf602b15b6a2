"""Capture: the hook inside the training process that writes tensors to a Zarr store.

Examples
--------
>>> from tdump.capture import Hook, HookConfig
>>> cfg = HookConfig(out="run.zarr", include_regex=".*relu|.*weight", save_interval=100)
>>> Hook.from_config(cfg).config.save_interval
100
"""

import importlib
from typing import TYPE_CHECKING, Any

from tdump.capture._config import (
    AUTO_COMPRESSION,
    COLLECTIONS,
    DEFAULT_INCLUDE,
    ENV_VAR,
    REDUCTIONS,
    CollectionConfig,
    HookConfig,
    default_writer_threads,
    load_config,
)
from tdump.capture._exit import TrainingStopped

if TYPE_CHECKING:
    from tdump.capture._hook import Hook, active_hooks, record_loss
    from tdump.capture._record import AutoCapture, run_script
    from tdump.capture._report import report

# torch loads on first use of these, so `tdump record` checks its input before importing it
_LAZY = {
    "Hook": "tdump.capture._hook",
    "active_hooks": "tdump.capture._hook",
    "record_loss": "tdump.capture._hook",
    "AutoCapture": "tdump.capture._record",
    "run_script": "tdump.capture._record",
    "report": "tdump.capture._report",
}

__all__ = [
    "AUTO_COMPRESSION",
    "COLLECTIONS",
    "DEFAULT_INCLUDE",
    "ENV_VAR",
    "REDUCTIONS",
    "AutoCapture",
    "CollectionConfig",
    "Hook",
    "HookConfig",
    "TrainingStopped",
    "active_hooks",
    "default_writer_threads",
    "load_config",
    "record_loss",
    "report",
    "run_script",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tdump.capture' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too (tab completion in Jupyter calls dir()), not the typing helpers
    from tdump._lazy import public_dir

    return public_dir(__all__, globals())
