"""The experiment directory: settings, state, one row per round, a lock (docs/FORMAT.md §4).

::

    exp/
      experiment.json     format, version, created, the loop's settings (written once)
      state.json          where the loop is: round, completed stages, running stage, status
      rounds.jsonl        one JSON object per completed round (rewritten atomically)
      commands.sh         every stage's command line, in order, rerunnable by hand
      .lock               held (flock) by the running loop
      round_000/ ...      one folder per round (see docs/loop.md)

Every file is written to a temporary name in the same folder and renamed, so a
reader (or a loop resumed after SIGKILL) sees the old file or the new one, never half.

Examples
--------
>>> import tempfile, os
>>> exp = Experiment.create(os.path.join(tempfile.mkdtemp(), "exp"), {"rounds": 3})
>>> exp.append_row({"round": 0, "params": 10})
>>> [r["round"] for r in Experiment.open(exp.path).rows()]
[0]
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tdump._version import __version__
from tdump.errors import ConfigError, FormatVersionError, LoopError, first_line

__all__ = [
    "EXPERIMENT_FORMAT",
    "EXPERIMENT_VERSION",
    "Experiment",
    "arch_needed",
    "atomic_write",
    "check_arch_now",
    "check_input_shape",
    "check_resumed_arch",
    "check_start",
]

EXPERIMENT_FORMAT = "tdump.experiment"
EXPERIMENT_VERSION = 1
_META = "experiment.json"
_STATE = "state.json"
_ROWS = "rounds.jsonl"
_COMMANDS = "commands.sh"
_LOCK = ".lock"


def atomic_write(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tdump-", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Experiment:
    """An experiment directory written by ``tdump loop``.

    Use :meth:`create` for a new one and :meth:`open` for an existing one.
    """

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = meta

    # ------------------------------------------------------------------ opening
    @staticmethod
    def is_experiment(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds an ``experiment.json``."""
        return (Path(path) / _META).is_file()

    @classmethod
    def create(cls, path: str | os.PathLike[str], settings: dict[str, Any]) -> Experiment:
        """Start a new experiment in ``path`` (absent or an empty folder)."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise LoopError(
                f"{p} is a file, not an experiment directory; choose another --experiment"
            )
        if cls.is_experiment(p):
            raise LoopError(
                f"{p} already holds an experiment; continue it with --resume or choose another --experiment"
            )
        if p.is_dir() and any(c.name != _LOCK for c in p.iterdir()):
            raise LoopError(
                f"{p} is a non-empty directory that is not a tdump experiment; choose another --experiment"
            )
        p.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": EXPERIMENT_FORMAT,
            "format_version": EXPERIMENT_VERSION,
            "writer": f"tdump {__version__}",
            "created": _now(),
            "settings": settings,
        }
        exp = cls(p, meta)
        atomic_write(p / _META, json.dumps(meta, indent=2) + "\n")
        return exp

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Experiment:
        """Open an existing experiment (one-line errors for anything else)."""
        p = Path(path)
        if not p.exists():
            raise LoopError(f"no experiment at {p}; check the path")
        if not cls.is_experiment(p):
            raise LoopError(f"{p} is not a tdump experiment (no {_META}); check the path")
        try:
            meta = json.loads((p / _META).read_text())
        except (OSError, ValueError) as exc:
            raise LoopError(f"{p / _META} cannot be read ({exc}); it is damaged") from None
        if meta.get("format") != EXPERIMENT_FORMAT:
            raise LoopError(f"{p / _META} is not a tdump experiment file")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > EXPERIMENT_VERSION:
            raise FormatVersionError(
                f"{p} is a tdump.experiment version {version}; this tdump reads up to "
                f"{EXPERIMENT_VERSION}: upgrade tdump"
            )
        return cls(p, meta)

    @property
    def settings(self) -> dict[str, Any]:
        """The loop's settings as stored when the experiment was created."""
        return dict(self.meta.get("settings") or {})

    def add_arch(self, arch: str, arch_kwargs: dict[str, Any] | None) -> None:
        """Record the ``--arch`` a resume supplied for an experiment started without one.

        One of the two changes ever made to ``experiment.json`` after :meth:`create`
        (with :meth:`replace_settings`), atomic; the other settings stay as they were.
        """
        settings = {**self.settings, "arch": arch, "arch_kwargs": arch_kwargs}
        self.meta = {**self.meta, "settings": settings, "arch_added": _now()}
        atomic_write(self.path / _META, json.dumps(self.meta, indent=2) + "\n")

    def replace_settings(self, changes: dict[str, Any]) -> None:
        """Record settings a resume replaced (``--stop-when``, ``--scheduler``, ``--workers``, TRAIN_ARGS).

        The old values are kept in ``replaced``, a list of ``{"time", "from", "to"}``,
        so ``experiment.json`` still says what earlier rounds ran under.
        """
        old = self.settings
        record = {
            "time": _now(),
            "from": {k: old.get(k) for k in changes},
            "to": dict(changes),
        }
        self.meta = {
            **self.meta,
            "settings": {**old, **changes},
            "replaced": [*(self.meta.get("replaced") or []), record],
        }
        atomic_write(self.path / _META, json.dumps(self.meta, indent=2) + "\n")

    def round_dir(self, r: int) -> Path:
        """The folder of round ``r`` (``round_002``), created on demand."""
        d = self.path / f"round_{r:03d}"
        d.mkdir(exist_ok=True)
        return d

    # ------------------------------------------------------------------ lock
    @staticmethod
    @contextmanager
    def lock(path: str | os.PathLike[str]) -> Iterator[None]:
        """Hold the lock of the experiment folder ``path`` (created if absent).

        A second holder gets a one-line :class:`LoopError`. It is an OS lock
        (``flock``): it goes away with the process, so a loop killed with SIGKILL
        never leaves a stale lock behind.
        """
        import fcntl

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise LoopError(
                f"{folder} is a file, not an experiment directory; choose another --experiment"
            )
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / _LOCK, "a+")  # noqa: SIM115 - held for the whole block
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise LoopError(
                    f"{folder} is in use by another tdump loop ({holder}); wait for it to end "
                    "or use another --experiment"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield
        finally:
            fh.close()

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Where the loop is (``{}`` before the first stage)."""
        try:
            data: dict[str, Any] = json.loads((self.path / _STATE).read_text())
            return data
        except FileNotFoundError:
            return {}

    def state_text(self) -> str | None:
        """``state.json`` as it is on disk (``None``: absent), for :meth:`restore_state`."""
        try:
            return (self.path / _STATE).read_text()
        except FileNotFoundError:
            return None

    def restore_state(self, text: str | None) -> None:
        """Put back ``state.json`` as :meth:`state_text` read it (atomically; ``None``: none)."""
        if text is None:
            (self.path / _STATE).unlink(missing_ok=True)
        else:
            atomic_write(self.path / _STATE, text)

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace ``state.json`` atomically (``updated`` is set here)."""
        state = {**state, "updated": _now()}
        atomic_write(self.path / _STATE, json.dumps(state, indent=1) + "\n")

    # ------------------------------------------------------------------ rows
    def rows(self) -> list[dict[str, Any]]:
        """The completed rounds, in order (one dict per line of ``rounds.jsonl``)."""
        try:
            text = (self.path / _ROWS).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``rounds.jsonl`` atomically: readers never see a half row."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write(self.path / _ROWS, text)

    def append_row(self, row: dict[str, Any]) -> None:
        """Add one completed round."""
        self.write_rows([*self.rows(), row])

    # ------------------------------------------------------------------ commands
    def log_command(self, r: int, stage: str, lines: list[str]) -> None:
        """Append a completed stage's command lines to ``commands.sh``.

        Only stages that succeeded are appended, so ``sh commands.sh`` in an empty
        folder (with the script) redoes the experiment's completed stages in order.
        """
        path = self.path / _COMMANDS
        new = not path.exists()
        with open(path, "a") as fh:
            if new:
                fh.write(
                    "#!/bin/sh\n# The stages tdump loop completed, in order (a stage retried "
                    "after a failure or a kill\n# is listed once); rerun them by hand, or all "
                    "with sh commands.sh\n# from the folder tdump loop ran in.\nset -e\n"
                )
            fh.write(f"\n# round {r}: {stage}  ({_now()})\n")
            fh.write("".join(line + "\n" for line in lines))

    def unlog_command(self, r: int, stages: tuple[str, ...]) -> None:
        """Take the last block of each of ``stages`` in round ``r`` out of ``commands.sh``.

        For a stage that completed but whose output a later stage rejected (a training
        that saved the wrong model): it runs again, and ``commands.sh`` lists it once.
        """
        path = self.path / _COMMANDS
        if not path.exists():
            return
        blocks = re.split(r"(?<=\n)(?=\n# round )", path.read_text())
        for stage in stages:
            head = f"\n# round {r}: {stage}  ("
            last = max((i for i, b in enumerate(blocks) if b.startswith(head)), default=None)
            if last is not None:
                del blocks[last]
        atomic_write(path, "".join(blocks))


def check_start(path: Path, settings: Any, resume: bool) -> None:
    """Refuse, before the lock is taken or anything written, what cannot start a loop.

    ``settings`` is the :class:`~tdump.loop.LoopSettings` given (a resumed loop uses
    the stored ones, checked once the experiment is open).
    """
    if path.exists() and not path.is_dir():
        raise LoopError(
            f"{path} is a file, not an experiment directory; choose another --experiment"
        )
    if resume:
        return
    settings.check()
    if Experiment.is_experiment(path):
        raise LoopError(
            f"{path} already holds an experiment; continue it with --resume or choose another --experiment"
        )
    if path.is_dir() and any(c.name != ".lock" for c in path.iterdir()):
        raise LoopError(
            f"{path} is a non-empty directory that is not a tdump experiment; choose another --experiment"
        )
    if settings.arch:  # a name that cannot be built fails now, not after round 0 trains
        check_arch_now(settings.arch, settings.folder())
        if settings.input_shape:
            check_input_shape(
                settings.arch, settings.arch_kwargs, settings.input_shape, settings.folder()
            )


def check_arch_now(arch: str, folder: str) -> None:
    """Resolve ``--arch`` before round 0 trains, so a name that cannot be built fails at once.

    The user named it, so importing it is allowed (as ``tdump prune --arch`` does);
    ``folder``, the script's (:meth:`LoopSettings.folder`), is on the path, as it is
    for the stages.
    """
    from tdump.surgery._arch import resolve_arch

    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        resolve_arch(arch, trusted=True)
    finally:
        if added:
            sys.path.remove(folder)


def check_input_shape(
    arch: str, arch_kwargs: dict[str, Any] | None, shape: list[int], folder: str
) -> None:
    """Refuse an ``--input-shape`` that ``arch`` cannot take, before round 0 trains.

    The model is built and run on PyTorch's meta device (shapes only: no weights, no
    arithmetic). Only an error that is not the meta device's own (a model reading
    values: ``.item()``, ``if x.sum() > 0``) refuses; a model that cannot be built or
    run that way is left to the measure step, which counts FLOPs only where it can.
    """
    import torch

    from tdump.surgery._arch import build_arch

    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        try:
            with torch.device("meta"):
                model = build_arch(arch, arch_kwargs).eval()
        except Exception:  # built in measure from the checkpoint, with what it infers
            return
        with torch.no_grad():
            model(torch.zeros(1, *shape, device="meta"))
    except Exception as exc:
        text = str(exc).strip()
        if "meta" in text.lower() or not isinstance(exc, (RuntimeError, ValueError)):
            return  # the meta device's limit, not the shape's: measure will say if it fails
        line = first_line(exc, 160)
        raise ConfigError(
            f"--input-shape {','.join(map(str, shape))} does not fit {arch}: a forward at "
            f"input ({', '.join(map(str, [1, *shape]))}) fails ({line}); give one example's "
            "shape, batch excluded, e.g. 3,32,32 for 32x32 RGB images"
        ) from None
    finally:
        if added:
            sys.path.remove(folder)


def check_resumed_arch(stored: str | None, given: str | None, path: Path) -> None:
    """Refuse to import an architecture read from experiment.json that the user did not name.

    A registered builder (torchvision, :func:`~tdump.surgery.register_arch`) is only
    looked up; anything else is an import path, i.e. code, and a file is not the user.
    """
    from tdump.surgery import is_registered_arch

    if not stored or given == stored:
        return
    if given is None and is_registered_arch(stored):
        return
    if given is None:
        raise ConfigError(
            f"{path}/experiment.json names the architecture {stored!r}, which tdump would "
            f"import; tdump never imports a name read from a file: resume with --arch {stored} "
            "if you trust it"
        )
    raise ConfigError(
        f"--arch {given} differs from the architecture {path}/experiment.json was started "
        f"with ({stored}); resume with --arch {stored}, or start a new --experiment"
    )


def arch_needed(model: str, experiment: str, script: str, dump: Path) -> str:
    """What to do when round 0's plain state_dict ``model`` cannot be rebuilt without --arch.

    Both forms ``--arch`` takes are named, with the recorded model type filled in where
    it says which (``__main__.Net``: a class defined in the script itself).

    >>> text = arch_needed("m.pt", "exp", "train.py", Path("none.zarr"))
    >>> "--arch MODULE.BUILDER" in text and "--arch SCRIPT.py:CLASS" in text
    True
    """
    from tdump.errors import TdumpError
    from tdump.surgery._io import dump_model_type

    try:
        recorded = dump_model_type(dump) if dump.exists() else None
    except TdumpError:  # an unreadable dump only means no example from it
        recorded = None
    module, _, name = (recorded or "").rpartition(".")
    in_module = recorded if recorded and module != "__main__" else "mynets.Net"
    in_script = f"{script}:{name if module == '__main__' else 'Net'}"
    return (
        f"round 0's checkpoint {model} is a plain state_dict of a model tdump cannot rebuild "
        f"by itself (the recorded model type{f' {recorded}' if recorded else ''} matches no "
        f"registered builder); continue with tdump loop --resume --experiment {experiment} "
        "--arch MODULE.BUILDER (a class or function in a module of the script's folder, e.g. "
        f"{in_module}) or --arch SCRIPT.py:CLASS (a class defined in the script itself, e.g. "
        f"{in_script}), with --arch-kwargs JSON if it takes arguments; or save it with "
        "tdump.surgery.save in the script"
    )
