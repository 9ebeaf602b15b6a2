"""Where a hook writes: the checks made before training, and create / append / overwrite.

:func:`prepare_out` runs when a :class:`~tdump.capture.Hook` is made (for ``tdump
record``: before the script starts). It turns every problem it can see with ``out``
into a one-line error while nothing has been trained yet:

* a local ``out`` must be creatable and writable (no regular file on the way, a
  folder where a probe file can be written);
* an existing path must be a tdump store; one that already holds records of this
  process's rank is refused unless ``write_mode`` is ``"append"`` (continue it) or
  ``"overwrite"`` (replace it).

Examples
--------
>>> from tdump.capture import HookConfig
>>> prepare_out(HookConfig(out="memory://doc/out.zarr")) is None
True
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tdump._protocols import require_protocol
from tdump.capture._config import WRITE_MODES, HookConfig
from tdump.errors import ConfigError, NotADumpError

if TYPE_CHECKING:  # the store's module (zarr) loads when a writer opens, not before
    from tdump._format import StoreWriter

__all__ = [
    "WRITE_MODES",
    "Existing",
    "local_path",
    "module_differences",
    "open_store",
    "prepare_out",
    "resolve_rank",
]


@dataclass
class Existing:
    """What an existing dump holds for this rank (the hook continues it in append mode)."""

    modules: dict[str, Any] | None
    next_steps: dict[str, int] = field(default_factory=dict)


def resolve_rank(cfg: HookConfig) -> tuple[int, int]:
    """``(rank, world_size)``: the config's, else torch.distributed's, else env ``RANK``."""
    if cfg.rank is not None:
        return cfg.rank, cfg.world_size or max(cfg.rank + 1, 1)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - broken installs
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_path(out: str) -> str | None:
    """The file-system path of a local ``out`` (plain path or ``file://`` URL), else ``None``."""
    if out.startswith("file://"):
        return out[len("file://") :]
    return None if "://" in out else out


def _check_writable(out: str, path: str) -> None:
    """Refuse a local ``path`` that cannot be created or written, before training."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    if os.path.isfile(path):
        raise NotADumpError(f"{out} is a file, not a tdump store; choose another --out path")
    if not os.path.isdir(here):
        raise ConfigError(
            f"cannot create {out}: {here} is a file, not a folder; choose another --out path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".tdump-probe-", dir=here)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {out}: {here} is not writable ({exc.strerror}); choose another --out path"
        ) from None


def _fs(out: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    return fs, root.rstrip("/")


def prepare_out(cfg: HookConfig) -> Existing | None:
    """Check ``cfg.out`` before training and apply ``cfg.write_mode`` (see module docstring).

    Returns what the existing dump holds for this rank when appending to one, else ``None``.
    """
    out = cfg.out
    require_protocol(out)
    local = local_path(out)
    if local is not None:
        _check_writable(out, local)
        if not os.path.exists(local):
            return None
        if not os.path.exists(os.path.join(local, "zarr.json")):
            if os.listdir(local):
                raise NotADumpError(
                    f"{out} is a non-empty directory that is not a tdump store; "
                    "choose another --out path"
                )
            return None
    else:
        try:
            fs, root = _fs(out)
            if not fs.exists(f"{root}/zarr.json"):
                return None
        except ImportError as exc:
            raise ConfigError(f"cannot open {out}: {exc}") from None
    from tdump._control import clear_stop_request
    from tdump._format import StoreReader

    reader = StoreReader(out)  # NotADumpError / FormatVersionError: one line
    rank, world = resolve_rank(cfg)
    held = (
        {m: reader.num_records(m, rank) for m in reader.modes(rank)}
        if rank in reader.ranks()
        else {}
    )
    if cfg.write_mode == "create":
        if any(held.values()):
            counts = ", ".join(f"{n} {m}" for m, n in held.items())
            raise ConfigError(
                f"{out} already holds a dump ({counts} record(s) of rank {rank}); pass --append "
                "to continue it or --overwrite to replace it (Hook: write_mode='append' or "
                "'overwrite'), or choose another --out path"
            )
        return None
    if cfg.write_mode == "overwrite":
        _remove(out, local, f"rank{rank}" if world > 1 else None)
        return None
    clear_stop_request(out)  # a stop request was meant for the run that wrote it
    meta = reader.meta(rank) if rank in reader.ranks() else {}
    nxt = meta.get("next_steps")
    next_steps = {str(k): int(v) for k, v in nxt.items()} if isinstance(nxt, dict) else {}
    for mode in held:
        steps = reader.steps(mode, rank)
        if steps.size:
            next_steps[mode] = max(next_steps.get(mode, 0), int(steps.max()) + 1)
    modules = meta.get("modules")
    return Existing(modules if isinstance(modules, dict) else None, next_steps)


def _remove(out: str, local: str | None, group: str | None) -> None:
    """Delete the dump at ``out`` (only ``group`` of it when given) for ``write_mode="overwrite"``."""
    from tdump._control import clear_stop_request

    clear_stop_request(out)
    if local is not None:
        target = os.path.join(local, group) if group else local
        if os.path.isdir(target):
            shutil.rmtree(target)
        return
    fs, root = _fs(out)
    target = f"{root}/{group}" if group else root
    if fs.exists(target):
        fs.rm(target, recursive=True)


def module_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How two ``modules`` trees (docs/FORMAT.md) differ in module paths and tensor shapes.

    >>> a = {"fc": {"params": {"weight": [2, 3]}, "buffers": {}}}
    >>> module_differences(a, {"fc": {"params": {"weight": [4, 3]}, "buffers": {}}})
    ['fc.weight [2, 3] vs [4, 3]']
    """
    diffs: list[str] = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            diffs.append(f"module {path!r} missing")
            continue
        if path not in old:
            diffs.append(f"module {path!r} new")
            continue
        for kind in ("params", "buffers"):
            a, b = old[path].get(kind) or {}, new[path].get(kind) or {}
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    full = f"{path}.{name}" if path else name
                    diffs.append(f"{full} {a.get(name)} vs {b.get(name)}")
    return diffs


def open_store(config: HookConfig) -> StoreWriter:
    """Create (or join, for another rank of a distributed run) the store ``config.out``."""
    from tdump._format import StoreWriter

    rank, world = resolve_rank(config)
    last: Exception | None = None
    for _ in range(20):  # ranks racing to create the root group
        try:
            return StoreWriter.create(
                config.out,
                rank=rank,
                world_size=world,
                config=config.to_dict(),
                mode="create" if config.write_mode == "create" else "append",
            )
        except NotADumpError as exc:
            if world <= 1:
                raise
            last = exc
            threading.Event().wait(0.1)
    assert last is not None
    raise last
