"""Running one stage of the loop as a process of its own, with its log and wall time.

Stages are ``tdump`` commands run as ``python -m tdump ...`` with the loop's own
interpreter (so a virtualenv carries over); their command lines are printed as
``tdump ...`` and logged in ``commands.sh``. A stage dies with the loop (Linux:
``PR_SET_PDEATHSIG``), so a killed loop leaves no stage running behind it.

Examples
--------
>>> shown(tdump_argv("rank", "dump.zarr", "-o", "ranks.parquet"))
'tdump rank dump.zarr -o ranks.parquet'
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdump.errors import needs_no_score, pruned_with_clause

__all__ = [
    "StageResult",
    "for_the_loop",
    "prune_removed",
    "rel_path",
    "remove_path",
    "remove_write_leftovers",
    "run_stage",
    "shown",
    "stage_notes",
    "substitute",
    "tdump_argv",
]

_PREFIX = [sys.executable, "-m", "tdump"]


def tdump_argv(*args: str) -> list[str]:
    """``[python, -m, tdump, *args]``: a tdump command run with this interpreter."""
    return [*_PREFIX, *args]


def shown(argv: Sequence[str]) -> str:
    """The shell line for ``argv``, with ``python -m tdump`` written as ``tdump``."""
    argv = list(argv)
    if argv[:3] == _PREFIX:
        argv = ["tdump", *argv[3:]]
    return shlex.join(argv)


def substitute(args: Sequence[str], values: Mapping[str, str | None]) -> list[str]:
    """Fill ``{init}``, ``{out}``, ``{round}`` in TRAIN_ARGS.

    A placeholder whose value is ``None`` (``{init}`` in round 0 without ``--init``)
    is dropped, with the option before it when it stands alone (``--init {init}``),
    or as a whole (``--init={init}``).

    Examples
    --------
    >>> substitute(["--init", "{init}", "--out={out}", "-r", "{round}"], {"init": None, "out": "m.pt", "round": "0"})
    ['--out=m.pt', '-r', '0']
    """
    out: list[str] = []
    for arg in args:
        missing = [k for k, v in values.items() if v is None and f"{{{k}}}" in arg]
        if missing:
            if arg == f"{{{missing[0]}}}" and out and out[-1].startswith("-"):
                out.pop()
            continue
        for k, v in values.items():
            arg = arg.replace(f"{{{k}}}", str(v))
        out.append(arg)
    return out


@dataclass
class StageResult:
    """How a stage ended: exit ``code``, wall ``seconds``, the last lines of its log."""

    code: int
    seconds: float
    tail: list[str]

    def error_line(self) -> str:
        """The line of the log that best says why the stage failed.

        The last line that is not tdump's own summary (``tdump: recorded ...``) nor
        traceback furniture: a script's message, or its exception line.

        >>> StageResult(3, 1.0, ["boom: disk full", "tdump: no trained module was seen"]).error_line()
        'boom: disk full'
        """
        for line in reversed(self.tail):
            text = line.strip()
            if text and not text.startswith(("File ", "^", "~", "tdump: ", "$ ")):
                return text.removeprefix("error: ")
        return f"exit status {self.code}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_stage(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> StageResult:
    """Run ``argv`` with stdout and stderr into ``log``; wait for it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(f"$ {shown(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    seconds = time.perf_counter() - t0
    try:
        tail = log.read_text(errors="replace").splitlines()[-15:]
    except OSError:
        tail = []
    return StageResult(code, seconds, tail)


def rel_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it (shorter commands)."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:
        return str(path)


def remove_path(path: Path) -> None:
    """Delete ``path``: a folder with its contents, a file or a link; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_write_leftovers(folder: Path) -> None:
    """Delete the temporary files of writes killed in ``folder`` (``.<name>.<hex>.partial``).

    tdump writes a file whole or not at all (:func:`tdump._atomic.write_atomic`): a
    hidden temporary beside it, then a rename. A stage killed mid-write leaves that
    temporary behind, under a name of its own, which the stage's rerun never reuses.
    """
    for tmp in folder.glob(".*.partial"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def prune_removed(log: Path) -> int | None:
    """``removed_channels`` from ``tdump prune --json``'s output in its log."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return int(json.loads(line)["removed_channels"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


_SAID = ("note: ", "warning: ")


def stage_notes(log: Path, *, own_only: bool = False) -> list[str]:
    """The ``note:`` and ``warning:`` lines a stage wrote to its log, in order, each once.

    Lines printed as ``tdump: warning: ...`` (by ``tdump record``) lose the ``tdump: ``;
    the notes in a ``--json`` summary (``tdump prune --json``) become ``note:`` lines.
    ``own_only``: only tdump's own ``tdump: ...`` lines (a training script's output
    is the script's business).

    Examples
    --------
    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "prune.log"
    >>> _ = log.write_text('$ tdump prune\\nnote: a\\n{"notes": ["b", "a"]}\\ntdump: warning: c\\n')
    >>> stage_notes(log)
    ['note: a', 'note: b', 'warning: c']
    """
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("{") and not own_only:
            try:
                notes = json.loads(text).get("notes")
            except (ValueError, AttributeError):
                continue
            found += [f"note: {n}" for n in notes or [] if isinstance(n, str)]
            continue
        if text.startswith("tdump: "):
            text = text.removeprefix("tdump: ")
        elif own_only:
            continue
        if text.startswith(_SAID):
            found.append(text)
    return list(dict.fromkeys(found))


#: Rank's note on layers it could not score, up to its advice (``tdump.analyze._diagnose``):
#: what to record, or that the surgery prunes them with the scored layers they are added to.
_UNSCORED = re.compile(
    r"note: no (?P<crit>\S+) scores for \d+ (?P<kind>conv layers?|layers?) "
    r"\((?P<layers>[^()]*)\): (?P<why>.*?); (?:to score them, record |tdump prune prunes )"
)


def _by_layer(layer: str, found: Mapping[str, Any]) -> Any:
    """``found``'s entry for ``layer``; a wrapper's prefix (``module.``) is skipped."""
    parts = layer.split(".")
    for i in range(len(parts)):
        hit = found.get(".".join(parts[i:]))
        if hit is not None:
            return hit
    return None


def for_the_loop(
    line: str,
    left_alone: Mapping[str, str] | None = None,
    pruned_with: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A rank note's ``tdump record --include ...`` hint, said as the loop's own option.

    The loop records through ``tdump record`` itself, so the user's remedy is the
    same ``--include`` (and ``--config``) given to ``tdump loop``. When every layer
    the note names needs no score, the note says why instead: the surgery leaves it
    alone (``left_alone``: the model's :func:`~tdump.loop._metrics.left_alone`, the
    round's ``left_alone``), so recording more would not prune it; or it prunes it
    with scored layers whose channels it shares (``pruned_with``: the round's
    ``pruned_with``, :func:`~tdump.loop._metrics.pruned_with`; a ResNet's downsample).

    Examples
    --------
    >>> for_the_loop("note: ...; to score them, record X: tdump record --include '.*relu|a'")
    "note: ...; to score them, record X: tdump loop SCRIPT --include '.*relu|a' (a new experiment)"
    >>> for_the_loop("note: taylor scores rest on one saved step")
    'note: taylor scores rest on one saved step'
    >>> print(for_the_loop(
    ...     "note: no taylor scores for 1 conv layer (conv_proj): no activation module receives "
    ...     "these channels alone; to score them, record X: tdump record --include 'a'",
    ...     {"conv_proj": "torch.cat (dim 1) with a class token"}))
    note: no taylor scores for 1 conv layer (conv_proj): no activation module receives these channels alone; tdump prune leaves it alone (torch.cat (dim 1) with a class token), so recording more would not prune it
    >>> print(for_the_loop(
    ...     "note: no taylor scores for 1 conv layer (down.0): no activation module receives "
    ...     "these channels alone; to score them, record X: tdump record --include 'a'",
    ...     {}, {"down.0": ["conv2"]}))
    note: no taylor scores for 1 conv layer (down.0): no activation module receives these channels alone; tdump prune prunes it with the scored layer whose channels it shares (conv2), so it needs no score of its own
    """
    found = _UNSCORED.match(line)
    if found and (left_alone or pruned_with) and " more" not in found["layers"]:
        layers = found["layers"].split(", ")
        alone = {x: _by_layer(x, left_alone or {}) for x in layers}
        shared = {x: _by_layer(x, pruned_with or {}) for x in layers if alone[x] is None}
        if all(alone[x] is not None or shared.get(x) for x in layers):
            return f"{line[: found.end('why')]}; {_no_score_needed(layers, alone, shared)}"
    head, sep, tail = line.partition(": tdump record --include ")
    if not sep:
        return line
    return f"{head}: tdump loop SCRIPT --include {tail} (a new experiment)"


def _no_score_needed(
    layers: Sequence[str], alone: Mapping[str, Any], shared: Mapping[str, Any]
) -> str:
    """Why the ``layers`` of a rank note need no score: ``alone`` (why the surgery never
    prunes each) and ``shared`` (the scored layers each is pruned with) cover them all."""
    frozen = [x for x in layers if alone[x] is not None]
    coupled = [x for x in layers if alone[x] is None]

    def whom(names: list[str]) -> str:  # named when the note's layers are of both kinds
        return ", ".join(names) if frozen and coupled else "it" if len(names) == 1 else "them"

    parts = []
    if frozen:
        why = "; ".join(dict.fromkeys(str(alone[x]) for x in frozen))
        parts.append(f"leaves {whom(frozen)} alone ({why})")
    if not coupled:
        return f"tdump prune {parts[0]}, so recording more would not prune {whom(frozen)}"
    scored = list(dict.fromkeys(m for x in coupled for m in shared[x]))
    parts.append(pruned_with_clause(whom(coupled), len(coupled), scored))
    return f"tdump prune {' and '.join(parts)}, so {needs_no_score(len(layers))}"
