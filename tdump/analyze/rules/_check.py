"""Evaluate rules over a dump: once over all committed steps (:func:`check`), or live (:func:`watch`).

Examples
--------
>>> import numpy as np
>>> from tdump._format import StoreWriter
>>> w = StoreWriter.create("memory://doc/check.zarr")
>>> for i, loss in enumerate([1.0, 0.5, float("nan")]):
...     w.write_tensor("train", i, "loss.output_0", np.asarray(loss, "f4"),
...                    attrs={"collection": "losses", "kind": "loss", "module": "loss"})
...     w.commit("train", i, step=10 * i)
>>> check("memory://doc/check.zarr", ["exploding_tensor"])
[Firing(rule='exploding_tensor', step=20, mode='train', why='loss.output_0: 1 NaN, 0 Inf', error=False)]
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tdump._control import write_stop_request
from tdump._names import no_mode_steps
from tdump.analyze._trial import Trial
from tdump.analyze.rules._base import Firing, NotEnoughSteps, RuleSkip
from tdump.analyze.rules._load import LoadedRule, load_rule, split_params
from tdump.errors import (
    ConfigError,
    DumpNotFoundError,
    MissingTensorError,
    NotADumpError,
    TdumpError,
)

__all__ = ["Checker", "check", "watch"]

#: Exit status of ``tdump check`` when a rule fired (0: none fired, 1: an error).
FIRED_EXIT_CODE = 3
OnFiring = Callable[[Firing], None]


class Checker:
    """Rules bound to one opened dump, remembering which steps each has seen.

    Parameters
    ----------
    dump
        Path or fsspec URL of the dump.
    rules
        Built-in names, ``FILE.py:CLASS`` specs, or rule classes.
    params
        ``{name: value}`` for every rule that takes ``name``, ``{"RULE.name": value}``
        for one rule (see :func:`tdump.analyze.rules.parse_params`).
    mode
        Mode every rule looks at (a rule's ``mode`` parameter, or its attribute).
    """

    def __init__(
        self,
        dump: str | os.PathLike[str],
        rules: Sequence[str | type],
        *,
        params: Mapping[str, Any] | None = None,
        mode: str | None = None,
        rank: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not rules:
            raise ConfigError("no rule given; pass --rule NAME or --rule FILE.py:CLASS")
        loaded = [load_rule(r) for r in rules]
        seen: set[str] = set()
        for r in loaded:
            if r.name in seen:
                raise ConfigError(f"rule {r.name} given twice; give each rule once")
            seen.add(r.name)
        per_rule = split_params(dict(params or {}), loaded)
        self.storage_options = dict(storage_options) if storage_options else None
        self.trial = Trial(dump, rank=rank, storage_options=storage_options)
        self.rules: list[tuple[str, Any]] = []
        for r in loaded:
            self.rules.append((r.name, _construct(r, self.trial, per_rule[r.name], mode)))
        # modes the user named (--mode, or a rule's mode parameter), not rules' defaults
        self.asked_modes = {mode} | {p.get("mode") for p in per_rule.values()}
        self.asked_modes.discard(None)
        self.seen: dict[str, set[int]] = {name: set() for name, _ in self.rules}
        #: steps each rule answered at (a skipped step was seen, not checked)
        self.checked: dict[str, set[int]] = {name: set() for name, _ in self.rules}
        #: per rule, why it could not evaluate (the last :class:`NotEnoughSteps` message)
        self.notes: dict[str, str] = {}
        self.failed: set[str] = set()

    def missing_mode(self) -> str | None:
        """A one-line error when a mode the user asked for has no saved steps, else ``None``."""
        present = self.trial.modes()
        for m in sorted(str(m) for m in self.asked_modes):
            if m not in present:
                return (
                    f"{no_mode_steps(self.trial.path, m, present)} "
                    "(pass one with --mode or -p mode=...)"
                )
        return None

    def pending(self) -> list[tuple[str, Any, int]]:
        """(rule name, rule, step) not evaluated yet, per rule in step order."""
        out: list[tuple[str, Any, int]] = []
        for name, rule in self.rules:
            if name in self.failed:
                continue
            try:
                steps = _rule_steps(rule, self.trial)
            except MissingTensorError as exc:
                self.notes[name] = str(exc)  # what it needs is not in the dump (yet)
                continue
            out.extend((name, rule, s) for s in steps if s not in self.seen[name])
        return out

    def evaluate(self, name: str, rule: Any, step: int) -> Firing | None:
        """Invoke one rule at one step; a firing, a failure (``error=True``), or ``None``."""
        self.seen[name].add(step)
        mode = getattr(rule, "mode", None)
        try:
            if hasattr(rule, "why"):
                rule.why = ""
            fired = rule.invoke_at_step(step)
        except NotEnoughSteps as exc:
            self.notes[name] = str(exc)
            return None
        except RuleSkip:
            return None
        except Exception as exc:
            self.failed.add(name)
            return Firing(name, step, mode, f"raised {type(exc).__name__}: {exc}", error=True)
        self.checked[name].add(step)
        if not fired:
            return None
        why = str(getattr(rule, "why", "") or "invoke_at_step returned True")
        return Firing(name, step, mode, why)


def _construct(r: LoadedRule, trial: Trial, params: dict[str, Any], mode: str | None) -> Any:
    accepted, var_kw = r.accepts()
    if mode is not None and ("mode" in accepted or var_kw):
        params = {"mode": mode, **params}
    try:
        rule = r.cls(trial, **params)
    except TdumpError as exc:
        raise type(exc)(f"rule {r.name}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"rule {r.name} cannot be created: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            f"rule {r.name} failed while being created: {type(exc).__name__}: {exc}"
        ) from None
    if mode is not None and "mode" not in params:
        rule.mode = mode
    if not hasattr(rule, "trial"):
        rule.trial = trial  # smdebug-shaped classes that do not call a base __init__
    try:
        _rule_steps(rule, trial)  # a bad tensor regex is refused now, in one line
    except MissingTensorError:
        pass  # not in the dump yet (a watcher waits)
    except TdumpError as exc:
        raise type(exc)(f"rule {r.name}: {exc}") from None
    return rule


def _in(mode: str | None) -> str:
    return f" ({mode})" if mode else ""


def _rule_steps(rule: Any, trial: Trial) -> list[int]:
    if callable(getattr(rule, "steps", None)):
        return list(rule.steps())
    mode = getattr(rule, "mode", None)
    if mode is not None and mode not in trial.modes():
        return []
    return trial.steps(mode)


def check(
    dump: str | os.PathLike[str],
    rules: Sequence[str | type],
    *,
    params: Mapping[str, Any] | None = None,
    mode: str | None = None,
    rank: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    on_firing: OnFiring | None = None,
    progress: bool = False,
    evaluated: dict[str, int] | None = None,
    notes: dict[str, str] | None = None,
) -> list[Firing]:
    """Evaluate ``rules`` at every committed step of ``dump``; the firings, in rule then step order.

    A rule that raises is reported once (``Firing.error``), not invoked again; the
    other rules go on. Parameters as for :class:`Checker`; ``evaluated``, when given,
    is filled with the number of steps each rule answered at (a step it skipped, for
    lack of data or of earlier saved steps, is not counted); ``notes`` with why a
    rule could not evaluate (:class:`~tdump.analyze.rules.NotEnoughSteps`).

    Raises
    ------
    ConfigError
        A rule that cannot be loaded or created, bad parameters, or a ``mode`` the
        dump has no steps of (one line).
    """
    checker = Checker(
        dump, rules, params=params, mode=mode, rank=rank, storage_options=storage_options
    )
    missing = checker.missing_mode()
    if missing is not None:
        # offline the dump is complete: a mode it lacks is a typo, not "nothing fired"
        raise ConfigError(missing)
    todo = checker.pending()
    out: list[Firing] = []
    bar = _progress(len(todo)) if progress and todo else None
    try:
        for name, rule, step in todo:
            if name in checker.failed:
                continue
            hit = checker.evaluate(name, rule, step)
            if hit is not None:
                out.append(hit)
                if on_firing is not None:
                    on_firing(hit)
            if bar is not None:
                bar[0].advance(bar[1])
    finally:
        if bar is not None:
            bar[0].stop()
    _outputs(checker, evaluated, notes)
    return out


def _outputs(
    checker: Checker, evaluated: dict[str, int] | None, notes: dict[str, str] | None
) -> None:
    if evaluated is not None:
        evaluated.update({name: len(steps) for name, steps in checker.checked.items()})
    if notes is not None:
        notes.update(checker.notes)


def _progress(total: int) -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    task = bar.add_task("checking", total=total)
    bar.start()
    return bar, task


def watch(
    dump: str | os.PathLike[str],
    rules: Sequence[str | type],
    *,
    params: Mapping[str, Any] | None = None,
    mode: str | None = None,
    rank: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    poll: float = 1.0,
    timeout: float | None = 600.0,
    until_step: int | None = None,
    stop: bool = True,
    requested_by: str = "tdump check --watch",
    on_firing: OnFiring | None = None,
    evaluated: dict[str, int] | None = None,
    notes: dict[str, str] | None = None,
) -> list[Firing]:
    """Follow a dump that training is still writing; evaluate each step as it commits.

    At the first firing, write a stop request into the dump (unless ``stop=False``,
    see :mod:`tdump._control`) and return. Also returns when no new record has
    committed for ``timeout`` seconds (``None``: never), or once a mode's last
    committed step is ``>= until_step``. Before the dump exists, waits for it (up to
    ``timeout``); a ``mode`` it has no steps of yet is waited for too. Rule errors
    are reported through ``on_firing`` and in the result; ``evaluated`` and
    ``notes`` as for :func:`check`.

    Returns
    -------
    list of Firing
        Rule errors, then the firing that stopped the watch (if any).
    """
    if poll <= 0:
        raise ConfigError(f"--poll must be > 0 seconds, got {poll}")
    url = os.fspath(dump)
    last_new = time.monotonic()
    # bad rules and parameters are refused now, not once the dump appears
    split_params(dict(params or {}), [load_rule(r) for r in rules])
    while True:
        try:
            # training may not have created the store, or its rank group, yet
            Trial(url, rank=rank, storage_options=storage_options)
            break
        except (DumpNotFoundError, NotADumpError, MissingTensorError):
            if timeout is not None and time.monotonic() - last_new > timeout:
                raise
            time.sleep(poll)
    checker = Checker(
        url, rules, params=params, mode=mode, rank=rank, storage_options=storage_options
    )
    try:
        return _follow(checker, url, poll, timeout, until_step, stop, requested_by, on_firing)
    finally:
        _outputs(checker, evaluated, notes)


def _follow(
    checker: Checker,
    url: str,
    poll: float,
    timeout: float | None,
    until_step: int | None,
    stop: bool,
    requested_by: str,
    on_firing: OnFiring | None,
) -> list[Firing]:
    storage_options = checker.storage_options
    last_new = time.monotonic()
    out: list[Firing] = []
    counts: tuple[int, ...] = ()
    while True:
        for name, rule, step in checker.pending():
            if name in checker.failed:
                continue
            hit = checker.evaluate(name, rule, step)
            if hit is None:
                continue
            out.append(hit)
            if on_firing is not None:
                on_firing(hit)
            if not hit.error:
                if stop:
                    reason = f"rule {hit.rule} fired at step {hit.step}{_in(hit.mode)}: {hit.why}"
                    write_stop_request(
                        url,
                        reason,
                        requested_by=requested_by,
                        step=hit.step,
                        storage_options=storage_options,
                    )
                return out
        now_counts = tuple(len(checker.trial.records(m)["step"]) for m in checker.trial.modes())
        if now_counts != counts:
            counts, last_new = now_counts, time.monotonic()
        if until_step is not None and any(
            checker.trial.steps(m)[-1] >= until_step for m in checker.trial.modes()
        ):
            return out
        if timeout is not None and time.monotonic() - last_new > timeout:
            return out
        time.sleep(poll)
        checker.trial.refresh()
