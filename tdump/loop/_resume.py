"""Resuming an experiment: the stored settings, the few a resume may replace, the checks.

A resumed loop runs with the settings in ``experiment.json``. Two things may change:
an ``--arch`` added to an experiment started without one (round 0 could not rebuild
its model), and the settings in :data:`~tdump.loop._settings.RESUME_REPLACEABLE`
(``--stop-when``, ``--scheduler``, ``--workers``, TRAIN_ARGS), which decide whether
the loop goes on, where ranking runs and how the trainings still to run are called,
never what a completed stage produced. Both are checked before anything is written,
and recorded in ``experiment.json``.

Examples
--------
>>> resume_hint("exp", LoopSettings("train.py"))
'tdump loop --resume --experiment exp'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tdump.loop._experiment import Experiment, check_arch_now, check_resumed_arch
from tdump.loop._settings import RESUME_REPLACEABLE, LoopSettings

if TYPE_CHECKING:
    from tdump.loop._events import LoopEvents

__all__ = ["finished", "prepare_resume", "resume_hint"]


def finished(rows: list[dict[str, Any]]) -> bool:
    """Whether the experiment with these rows has ended (its last row has a stop reason)."""
    return bool(rows and rows[-1].get("stop_reason"))


def resume_hint(path: str | os.PathLike[str], settings: LoopSettings) -> str:
    """The command that continues ``path``, with ``--arch`` when it must be given again.

    An import path (``train.py:Net``) read from experiment.json is never imported
    unless the user names it again; a registered builder needs nothing.
    """
    command = f"tdump loop --resume --experiment {path}"
    if settings.arch:
        from tdump.surgery import is_registered_arch

        if not is_registered_arch(settings.arch):
            command += f" --arch {settings.arch}"
    return command


def prepare_resume(
    exp: Experiment,
    given: LoopSettings,
    events: LoopEvents,
    replace: Collection[str] = (),
) -> LoopSettings:
    """The settings the resumed loop of ``exp`` runs with, checked before any stage runs.

    ``given`` holds what the resume was asked for: its ``arch`` (required again for an
    import path, or adopted by an experiment started without one), and, for the names
    in ``replace`` (a subset of ``RESUME_REPLACEABLE``), values that replace the stored
    ones (``stop_when=""``: no condition). A finished experiment is returned as stored:
    resuming it only shows its rows, so nothing is imported or checked.

    From the start, ``state.json`` says ``running`` (``experiments show`` no longer
    says "interrupted" while the checks import the script); a refusal restores it.
    """
    stored = LoopSettings.from_dict(exp.settings)
    if finished(exp.rows()):
        return stored
    unknown = sorted(set(replace) - set(RESUME_REPLACEABLE))
    if unknown:
        raise ValueError(f"settings that a resume cannot replace: {', '.join(unknown)}")
    previous = exp.state_text()
    running = {"stage": "resume", "pid": os.getpid()}
    exp.write_state(
        {**exp.state(), "status": "running", "error": None, "interrupted": None, "running": running}
    )
    try:
        check_resumed_arch(stored.arch, given.arch, Path(exp.path))
        if given.arch or stored.arch:  # before anything is written or trained
            check_arch_now(given.arch or stored.arch or "", stored.folder())
        changes: dict[str, Any] = {}
        for name in replace:
            value = getattr(given, name)
            if name == "stop_when" and not value:
                value = None  # --stop-when '': no condition any more
            if value != getattr(stored, name):
                changes[name] = value
        candidate = dataclasses.replace(stored, **changes)
        if stored.arch is None and given.arch is not None:
            candidate = dataclasses.replace(
                candidate, arch=given.arch, arch_kwargs=given.arch_kwargs
            )
        candidate.check()
    except BaseException:
        exp.restore_state(previous)  # refused: the experiment is as it was
        raise
    if stored.arch is None and given.arch is not None:
        # started without --arch (round 0 could not rebuild its model): adopt it
        exp.add_arch(given.arch, given.arch_kwargs)
    if changes:
        exp.replace_settings(changes)
        for name, value in changes.items():
            flag = "TRAIN_ARGS" if name == "train_args" else "--" + name.replace("_", "-")
            events.note(
                f"{flag} is now {_shown(value)} (was {_shown(getattr(stored, name))}); "
                f"recorded in {exp.path}/experiment.json"
            )
    return LoopSettings.from_dict(exp.settings)


def _shown(value: Any) -> str:
    if isinstance(value, list):  # TRAIN_ARGS, as typed after `--`
        return repr(" ".join(value)) if value else "none"
    return "none" if value is None else repr(value)
