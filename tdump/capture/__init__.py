"""Capture: the hook inside the training process that writes tensors to a Zarr store.

Examples
--------
>>> from tdump.capture import Hook, HookConfig
>>> cfg = HookConfig(out="run.zarr", include_regex=".*relu|.*weight", save_interval=100)
>>> Hook.from_config(cfg).config.save_interval
100
"""

from tdump.capture._config import (
    AUTO_COMPRESSION,
    COLLECTIONS,
    DEFAULT_INCLUDE,
    ENV_VAR,
    REDUCTIONS,
    CollectionConfig,
    HookConfig,
    load_config,
)
from tdump.capture._hook import Hook, active_hooks, record_loss
from tdump.capture._record import AutoCapture, run_script

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
    "active_hooks",
    "load_config",
    "record_loss",
    "run_script",
]
