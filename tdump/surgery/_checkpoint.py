"""The pickle-free checkpoint (``tdump.checkpoint`` v1) and reading input checkpoints.

A tdump checkpoint is a dict of strings, numbers, lists and tensors, so
``torch.load(path, weights_only=True)`` opens it (docs/FORMAT.md section 3)::

    {"format": "tdump.checkpoint", "format_version": 1, "writer": "tdump 0.1.0",
     "created": "2026-01-01T00:00:00+00:00", "arch": "torchvision.models.resnet18",
     "arch_kwargs": {"num_classes": 10}, "ignore": None, "rounds": 1,
     "plan": {"conv1": {"channels": 64, "keep": [0, 2, ...]}, ...},
     "state_dict": {...}}

Reading validates every field and answers any bad file with one line
(:class:`~tdump.errors.CheckpointError`); nothing named in a file is imported here
(architectures are resolved by :mod:`tdump.surgery._arch`).

Examples
--------
>>> import torch, tempfile, os
>>> m = torch.nn.Linear(2, 1)
>>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> write_checkpoint(path, m, "torch.nn.Linear", {"in_features": 2, "out_features": 1}, {}, rounds=0)
>>> sorted(torch.load(path, weights_only=True))[:3]
['arch', 'arch_kwargs', 'created']
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdump._atomic import write_atomic
from tdump._version import __version__
from tdump.errors import (
    CheckpointError,
    ConfigError,
    DumpNotFoundError,
    FormatVersionError,
    first_line,
)

__all__ = [
    "CKPT_FORMAT",
    "CheckpointInfo",
    "load_state",
    "no_checkpoint",
    "read_checkpoint",
    "strip_prefix",
    "write_checkpoint",
]

CKPT_FORMAT = "tdump.checkpoint"
CKPT_VERSION = 1
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")


def no_checkpoint(path: str | os.PathLike[str]) -> str:
    """What to say when there is no checkpoint at ``path``.

    >>> no_checkpoint("ckpt.pt")
    'no checkpoint at ckpt.pt; check the path'
    """
    return f"no checkpoint at {path}; check the path"


@dataclass
class CheckpointInfo:
    """What an input checkpoint holds besides tensors.

    ``kind`` is ``"tdump"`` (a tdump checkpoint), ``"wrapped"`` (a dict holding a
    state_dict under a usual key) or ``"state_dict"``. ``plan`` is the cumulative
    plan as stored (``{layer: {"channels": n, "keep": [...]}}``). ``arch`` and
    ``arch_kwargs`` are as read from the file: nothing is imported or called here.
    """

    kind: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: int = 0
    ignore: str | None = None
    notes: list[str] = field(default_factory=list)
    input_shape: list[int] | None = None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _with_meta(items: Any, meta: Any) -> OrderedDict[str, torch.Tensor]:
    """An OrderedDict of ``items`` carrying ``meta`` as ``_metadata`` (module versions)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(items)
    if isinstance(meta, dict):
        out._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
    return out


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> OrderedDict[str, torch.Tensor]:
    """Drop ``prefix`` from every key that has it, keeping ``_metadata`` (its keys too).

    >>> import torch
    >>> list(strip_prefix({"module.w": torch.zeros(1)}, "module."))
    ['w']
    """
    meta = getattr(sd, "_metadata", None)
    items = ((k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in sd.items())
    if isinstance(meta, dict):
        base = prefix[:-1] if prefix.endswith(".") else prefix
        meta = {
            ("" if k == base else k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in meta.items()
        }
    return _with_meta(items, meta)


def _strip(sd: Mapping[str, torch.Tensor], info: CheckpointInfo) -> OrderedDict[str, torch.Tensor]:
    """``sd`` without the prefixes of DataParallel/DDP (``module.``) and torch.compile."""
    out = _with_meta(sd.items(), getattr(sd, "_metadata", None))
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = strip_prefix(out, prefix)
            info.notes.append(f"stripped the prefix {prefix!r} from the checkpoint's keys")
    return out


def _sniff(path: str) -> None:
    """Say what ``path`` is not before torch tries (empty, a folder, not a torch.save file)."""
    if os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; give the .pt file torch.save wrote"
        )
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint; was it fully written?")
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as fh:
        head = fh.read(4)
    # a zip archive (torch.save) that is_zipfile refused: its central directory, at its
    # end, is missing
    if head[:2] == b"PK":
        raise CheckpointError(
            f"{path} looks truncated (a zip archive that ends early, {size} bytes): was it fully "
            "written? Wait for the save to finish or use a complete copy"
        )
    if head[:1] != b"\x80":  # torch.save writes a zip archive, or (legacy) a pickle
        raise CheckpointError(
            f"{path} is not a torch checkpoint: neither the zip archive nor the pickle torch.save writes "
            f"({size} bytes starting {head[:2].hex()}); check the path"
        )


def _load(path: str) -> Any:
    _sniff(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "global" in str(exc):
            raise CheckpointError(
                f"{path} holds pickled Python objects, so torch.load(weights_only=True) refuses it and "
                "tdump never unpickles code. It is probably a whole pickled model: re-save it with "
                "torch.save(model.state_dict(), path) and pass --arch, or save a tdump checkpoint "
                "with tdump.save(model, path, arch=...)"
            ) from None
        what = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else "unreadable"
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({what})") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt: "
            f"{first_line(exc, 120)})"
        ) from None


def _bad(path: str, key: str, want: str, got: Any) -> CheckpointError:
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return CheckpointError(
        f"{path} is a tdump checkpoint whose '{key}' should be {want}, got {shown[:60]}; "
        "the file is damaged or was not written by tdump"
    )


def _tdump_info(
    obj: dict[str, Any], path: str
) -> tuple[OrderedDict[str, torch.Tensor], CheckpointInfo]:
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad(path, "format_version", "an integer", version)
    if version > CKPT_VERSION:
        raise FormatVersionError(
            f"{path} is tdump.checkpoint version {version}; this tdump reads {CKPT_VERSION}, upgrade tdump"
        )
    if version < 1:
        raise _bad(path, "format_version", "1", version)
    arch = obj.get("arch")
    if arch is None:
        raise CheckpointError(
            f"{path} is a tdump checkpoint without 'arch', so the model cannot be rebuilt; "
            "pass --arch (arch= in Python) or re-save it with tdump.save(model, path, arch=...)"
        )
    if not isinstance(arch, str) or not arch:
        raise _bad(path, "arch", "a string", arch)
    kwargs = obj.get("arch_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad(path, "arch_kwargs", "a dict", kwargs)
    rounds = obj.get("rounds", 0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise _bad(path, "rounds", "a non-negative integer", rounds)
    ignore = obj.get("ignore")
    if ignore is not None and not isinstance(ignore, str):
        raise _bad(path, "ignore", "a regex string or None", ignore)
    shape = obj.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list)
        and shape
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise _bad(path, "input_shape", "a list of positive integers or None", shape)
    plan = obj.get("plan") or {}
    if not isinstance(plan, dict):
        raise _bad(path, "plan", "a dict", plan)
    for layer, lp in plan.items():
        ok = (
            isinstance(layer, str)
            and isinstance(lp, dict)
            and isinstance(lp.get("channels"), int)
            and isinstance(lp.get("keep"), list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in lp["keep"])
        )
        if not ok:
            raise _bad(path, f"plan[{layer!r}]", '{"channels": int, "keep": [int, ...]}', lp)
    sd: Any = obj.get("state_dict")
    if not _is_state_dict(sd):
        raise _bad(path, "state_dict", "a dict of tensors", sd)
    # the outer dict carries the module versions too (so load_state_dict(torch.load(path)) sees them)
    meta = getattr(sd, "_metadata", None) or getattr(obj, "_metadata", None)
    info = CheckpointInfo(
        "tdump", arch, dict(kwargs), dict(plan), rounds, ignore, input_shape=shape
    )
    return _with_meta(sd.items(), meta), info


def read_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[OrderedDict[str, torch.Tensor], CheckpointInfo]:
    """Load ``path`` safely (``weights_only=True``) and return ``(state_dict, info)``.

    The state_dict keeps torch's ``_metadata`` (module versions), and ``module.`` /
    ``_orig_mod.`` prefixes (DDP, ``torch.compile``) are removed.

    Raises
    ------
    CheckpointError
        Empty, truncated or foreign files, pickled objects (a whole model), a dict
        holding no state_dict, a tdump checkpoint with missing or mistyped fields.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DumpNotFoundError(no_checkpoint(path))
    obj = _load(path)
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != CKPT_FORMAT:
            raise CheckpointError(
                f"{path} has format {str(obj['format'])[:40]!r}, not {CKPT_FORMAT!r}; "
                "give a tdump checkpoint or a state_dict"
            )
        return _tdump_info(obj, path)
    if _is_state_dict(obj):
        info = CheckpointInfo("state_dict")
        return _strip(obj, info), info
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                arch = obj.get("arch")
                if arch is not None and not isinstance(arch, str):
                    raise CheckpointError(
                        f"{path} has an 'arch' entry that is a {type(arch).__name__}, not a string"
                    )
                kwargs = obj.get("arch_kwargs")
                if kwargs is not None and not isinstance(kwargs, dict):
                    raise CheckpointError(
                        f"{path} has an 'arch_kwargs' entry that is a {type(kwargs).__name__}, not a dict"
                    )
                info = CheckpointInfo("wrapped", arch, dict(kwargs or {}))
                return _strip(obj[key], info), info
        keys = ", ".join(sorted(str(k) for k in obj)[:8])
        raise CheckpointError(
            f"{path} holds a dict without a state_dict (keys: {keys}); expected a state_dict or one under 'state_dict'/'model'"
        )
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a state_dict or a tdump checkpoint"
    )


def _listed(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_state(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    arch: str,
    path: str,
    hint: str = "",
    *,
    keys_only: bool = False,
) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a one-line :class:`CheckpointError`.

    ``keys_only`` only checks that the keys are the model's (loads nothing): a
    state_dict of another architecture is said before its shapes are compared.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {list(sd[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape and not keys_only
    ]
    fix = hint or "check --arch and --arch-kwargs"
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listed(unexpected)}")
        if shapes:
            parts.append(f"shape {_listed(shapes, 2)} (checkpoint vs arch)")
        raise CheckpointError(f"{path} does not match {arch}: {'; '.join(parts)}; {fix}")
    if keys_only:
        return
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as exc:  # a module's own _load_from_state_dict refusing (versions, dtypes)
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path} does not load into {arch}: {msg}; {fix}") from None


def write_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any],
    plan: dict[str, dict[str, Any]],
    *,
    rounds: int,
    ignore: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Write a tdump checkpoint atomically (temporary file in the same folder + rename).

    The file gets the usual mode (``0o666`` less the umask). The state_dict keeps
    its ``_metadata`` (module versions, e.g. MNASNet's), and so does the outer dict,
    so ``model.load_state_dict(torch.load(path))`` on a model from
    :func:`tdump.load` sees them too.
    """
    try:
        json.dumps(arch_kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"arch_kwargs must be JSON-able (str, numbers, lists, dicts): {exc}"
        ) from None
    state = model.state_dict()
    meta = getattr(state, "_metadata", None)
    sd = _with_meta(((k, v.detach().cpu().contiguous()) for k, v in state.items()), meta)
    body = {
        "format": CKPT_FORMAT,
        "format_version": CKPT_VERSION,
        "writer": f"tdump {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "ignore": ignore,
        "input_shape": [int(n) for n in input_shape] if input_shape else None,
        "rounds": rounds,
        "plan": {
            k: {"channels": int(v["channels"]), "keep": [int(i) for i in v["keep"]]}
            for k, v in plan.items()
        },
        "state_dict": sd,
    }
    obj = _with_meta(body.items(), meta)
    path = os.fspath(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, lambda fh: torch.save(obj, fh), tmp_prefix=".tdump-")
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
