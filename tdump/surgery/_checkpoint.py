"""The pickle-free checkpoint (``tdump.checkpoint`` v1) and reading input checkpoints.

A tdump checkpoint is a plain dict of strings, numbers, lists and tensors, so
``torch.load(path, weights_only=True)`` opens it (docs/FORMAT.md section 3)::

    {"format": "tdump.checkpoint", "format_version": 1, "writer": "tdump 0.1.0",
     "created": "2026-01-01T00:00:00+00:00", "arch": "torchvision.models.resnet18",
     "arch_kwargs": {"num_classes": 10}, "ignore": None, "rounds": 1,
     "plan": {"conv1": {"channels": 64, "keep": [0, 2, ...]}, ...},
     "state_dict": {...}}

Examples
--------
>>> import torch, tempfile, os
>>> m = build_arch("torch.nn.Linear", {"in_features": 2, "out_features": 1})
>>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> write_checkpoint(path, m, "torch.nn.Linear", {"in_features": 2, "out_features": 1}, {}, rounds=0)
>>> sorted(torch.load(path, weights_only=True))[:3]
['arch', 'arch_kwargs', 'created']
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdump._version import __version__
from tdump.errors import CheckpointError, ConfigError, DumpNotFoundError, FormatVersionError

__all__ = ["CKPT_FORMAT", "CheckpointInfo", "build_arch", "read_checkpoint", "write_checkpoint"]

CKPT_FORMAT = "tdump.checkpoint"
CKPT_VERSION = 1
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class CheckpointInfo:
    """What an input checkpoint holds besides tensors.

    ``kind`` is ``"tdump"`` (a tdump checkpoint), ``"wrapped"`` (a dict holding a
    state_dict under a usual key) or ``"state_dict"``. ``plan`` is the cumulative
    plan as stored (``{layer: {"channels": n, "keep": [...]}}``).
    """

    kind: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: int = 0
    ignore: str | None = None


def build_arch(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Construct ``arch`` (``pkg.module.factory`` or ``pkg.module:factory``) with ``kwargs``.

    The current directory is importable, so ``mymodels.Net`` works from a project root.
    """
    module_name, _, attr = arch.partition(":") if ":" in arch else arch.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"--arch must be an import path like torchvision.models.resnet18, got {arch!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import architecture {arch!r}: {exc}") from None
    try:
        model = obj(**(kwargs or {}))
    except Exception as exc:
        raise ConfigError(f"cannot construct {arch}(**{json.dumps(kwargs or {})}): {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{arch} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Load ``path`` safely (``weights_only=True``) and return ``(state_dict, info)``.

    Raises
    ------
    CheckpointError
        For pickled objects (a full model), or a file holding no state_dict.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DumpNotFoundError(f"no checkpoint at {path}; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = (
            str(exc).split("\n")[0]
            if "GLOBAL" not in str(exc)
            else "it holds pickled Python objects"
        )
        raise CheckpointError(
            f"{path} cannot be opened with torch.load(weights_only=True) ({what[:160].strip()}); "
            "tdump never unpickles code. It is probably a whole pickled model: re-save it with "
            "torch.save(model.state_dict(), path) and pass --arch, or save a tdump checkpoint "
            "with tdump.surgery.save(path, model, arch=...)"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a torch checkpoint ({str(exc).splitlines()[0][:160]})"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        version = int(obj.get("format_version", 0))
        if version > CKPT_VERSION:
            raise FormatVersionError(
                f"{path} is tdump.checkpoint version {version}; this tdump reads {CKPT_VERSION}, upgrade tdump"
            )
        info = CheckpointInfo(
            "tdump",
            obj["arch"],
            dict(obj.get("arch_kwargs") or {}),
            dict(obj.get("plan") or {}),
            int(obj.get("rounds", 0)),
            obj.get("ignore"),
        )
        return dict(obj["state_dict"]), info
    if _is_state_dict(obj):
        return _strip(obj), CheckpointInfo("state_dict")
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
                kwargs = obj.get("arch_kwargs")
                kw: dict[str, Any] = dict(kwargs) if isinstance(kwargs, dict) else {}
                return _strip(obj[key]), CheckpointInfo("wrapped", arch, kw)
        keys = ", ".join(sorted(str(k) for k in obj)[:8])
        raise CheckpointError(
            f"{path} holds a dict without a state_dict (keys: {keys}); expected a state_dict or one under 'state_dict'/'model'"
        )
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a state_dict or a tdump checkpoint"
    )


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], arch: str, path: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a one-line :class:`CheckpointError`."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {list(sd[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
            )
        if shapes:
            parts.append(
                f"shape {'; '.join(shapes[:2])}{' ...' if len(shapes) > 2 else ''} (checkpoint vs arch)"
            )
        raise CheckpointError(
            f"{path} does not match {arch}: {'; '.join(parts)}; check --arch and --arch-kwargs"
        )
    model.load_state_dict(sd, strict=True)


def write_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any],
    plan: dict[str, dict[str, Any]],
    *,
    rounds: int,
    ignore: str | None = None,
) -> None:
    """Write a tdump checkpoint atomically (temporary file in the same folder + rename)."""
    try:
        json.dumps(arch_kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"arch_kwargs must be JSON-able (str, numbers, lists, dicts): {exc}"
        ) from None
    obj = {
        "format": CKPT_FORMAT,
        "format_version": CKPT_VERSION,
        "writer": f"tdump {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "ignore": ignore,
        "rounds": rounds,
        "plan": {
            k: {"channels": int(v["channels"]), "keep": [int(i) for i in v["keep"]]}
            for k, v in plan.items()
        },
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tdump-", suffix=".partial", dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
