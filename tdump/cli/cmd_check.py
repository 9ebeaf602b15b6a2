"""`tdump check DUMP --rule ...`: evaluate rules over a dump, once or while training writes it.

Exit status: 0 no rule fired, 3 a rule fired (:data:`FIRED_EXIT_CODE`), 1 an error
(bad input, or a rule that raised while none fired). ``docs/rules.md`` has the rules.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from tdump.cli._help import TdumpCommand

__all__ = ["register"]

FIRED_EXIT_CODE = 3  # = tdump.analyze.rules.FIRED_EXIT_CODE (no analyze import at startup)
_SHOWN = 10  # firing steps printed per rule


def _where(step: int, mode: str | None) -> str:
    return f"step {step}" + (f" ({mode})" if mode else "")


def _report(
    dump: str,
    names: list[str],
    firings: list[Any],
    evaluated: dict[str, int],
    notes: dict[str, str],
) -> dict:
    rules = []
    for name in names:
        mine = [f for f in firings if f.rule == name and not f.error]
        error = next((f for f in firings if f.rule == name and f.error), None)
        rules.append(
            {
                "rule": name,
                "steps_checked": evaluated.get(name, 0),
                "note": notes.get(name) if not evaluated.get(name, 0) else None,
                "fired": [{"step": f.step, "mode": f.mode, "why": f.why} for f in mine],
                "error": None
                if error is None
                else {"step": error.step, "mode": error.mode, "message": error.why},
            }
        )
    fired = any(r["fired"] for r in rules)
    failed = any(r["error"] for r in rules)
    code = FIRED_EXIT_CODE if fired else (1 if failed else 0)
    return {"dump": dump, "fired": fired, "exit_code": code, "rules": rules}


def _render(report: dict) -> None:
    from tdump.cli._console import console

    for r in report["rules"]:
        fired, n = r["fired"], r["steps_checked"]
        if fired:
            console.print(
                f"[bold]{r['rule']}[/]: fired at {len(fired)} of {n} steps checked, "
                f"first at {_where(fired[0]['step'], fired[0]['mode'])}",
                soft_wrap=True,
            )
            for f in fired[:_SHOWN]:
                console.print(f"  {_where(f['step'], f['mode'])}: {f['why']}", soft_wrap=True)
            if len(fired) > _SHOWN:
                console.print(f"  ... {len(fired) - _SHOWN} more (--json lists all)")
        elif r["error"] is None and r["note"]:
            # it evaluated nothing for lack of saved steps: "no firing" would mislead
            console.print(f"[bold]{r['rule']}[/]: {r['note']}", soft_wrap=True)
        elif r["error"] is None:
            hint = "" if n else " (it found no data to read in this dump)"
            console.print(
                f"[bold]{r['rule']}[/]: no firing, {n} step{'' if n == 1 else 's'} checked{hint}",
                soft_wrap=True,
            )


def _error_line(f: Any) -> None:
    from tdump.cli._console import err_console

    err_console.print(
        f"[bold red]error:[/] rule {f.rule} {f.why} at {_where(f.step, f.mode)}; "
        "it is skipped from here on, the other rules go on",
        soft_wrap=True,
    )


class _CheckCommand(TdumpCommand):
    def extra_hint(self, words: list[str]) -> str | None:
        """``tdump check run.zarr dead_relu``: rules are named with ``--rule``.

        >>> _CheckCommand(name="check").extra_hint(["dead_relu", "my.py:Rule"])
        'rules are named with --rule: tdump check DUMP --rule dead_relu --rule my.py:Rule'
        """
        rules = " ".join(f"--rule {w}" for w in words)
        return f"rules are named with --rule: tdump check DUMP {rules}"


def register(app: typer.Typer) -> None:
    """Add the ``check`` command to ``app``."""

    @app.command("check", cls=_CheckCommand)
    def check_cmd(
        dump: str = typer.Argument(
            ..., metavar="DUMP", help="Dump path or fsspec URL (file://, s3://, ...)."
        ),
        rule: list[str] = typer.Option(
            [],
            "--rule",
            "-r",
            metavar="RULE",
            help="A built-in rule name, or FILE.py:CLASS (repeat for several) "
            "[default: every built-in rule].",
            show_default=False,
        ),
        param: list[str] = typer.Option(
            [],
            "--param",
            "-p",
            metavar="NAME=VALUE",
            help="NAME=VALUE (JSON where it parses, else a string); RULE.NAME=VALUE for one rule.",
        ),
        mode: str | None = typer.Option(
            None,
            "--mode",
            metavar="MODE",
            help="Mode the rules look at (train, eval ...) [rule's default].",
        ),
        rank: int = typer.Option(0, "--rank", metavar="R", help="DDP rank whose part is checked."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON report instead."),
        watch: bool = typer.Option(
            False, "--watch", help="Follow a dump training is still writing; stop it on a firing."
        ),
        poll: float = typer.Option(
            1.0, "--poll", metavar="SECONDS", help="--watch: seconds between looks."
        ),
        timeout: float = typer.Option(
            600.0,
            "--timeout",
            metavar="SECONDS",
            help="--watch: give up after this many seconds without a new record (0: never).",
        ),
        until_step: int | None = typer.Option(
            None,
            "--until-step",
            metavar="STEP",
            help="--watch: stop watching once a step >= this is committed.",
        ),
        no_stop: bool = typer.Option(
            False, "--no-stop", help="--watch: report a firing but write no stop request."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Evaluate rules at every committed step of DUMP; exit 3 if one fired, 0 if none.

        Without --rule, every built-in rule runs (a rule the dump has no data for says so).

        Example: tdump check run.zarr --rule exploding_tensor --rule my_rules.py:CheckAccuracy
        --param CheckAccuracy.previous_accuracy=0.91
        """
        from tdump.analyze.rules import builtin_rules, check, load_rule, parse_params
        from tdump.analyze.rules import watch as watch_dump
        from tdump.cli._console import console, err_console
        from tdump.errors import ConfigError

        if watch and poll <= 0:
            raise ConfigError(f"--poll must be > 0 seconds, got {poll:g}")
        params = parse_params(param)
        rule = rule or builtin_rules()
        names = [load_rule(r).name for r in rule]
        evaluated: dict[str, int] = {}
        notes: dict[str, str] = {}

        def on_firing(f: Any) -> None:
            if f.error:
                _error_line(f)

        if watch:
            if not as_json:
                err_console.print(
                    f"watching {dump} (rules {', '.join(names)}; poll {poll:g} s, "
                    f"{f'timeout {timeout:g} s' if timeout else 'no timeout'})",
                    soft_wrap=True,
                )
            firings = watch_dump(
                dump,
                rule,
                params=params,
                mode=mode,
                rank=rank,
                poll=poll,
                timeout=timeout or None,
                until_step=until_step,
                stop=not no_stop,
                on_firing=on_firing,
                evaluated=evaluated,
                notes=notes,
            )
        else:
            firings = check(
                dump,
                rule,
                params=params,
                mode=mode,
                rank=rank,
                on_firing=on_firing,
                progress=not (quiet or as_json) and console.is_terminal,
                evaluated=evaluated,
                notes=notes,
            )
        report = _report(dump, names, firings, evaluated, notes)
        fired = [f for f in firings if not f.error]
        if watch:
            stopped = fired and not no_stop
            report["stop_request_step"] = fired[0].step if stopped else None
        if as_json:
            typer.echo(json.dumps(report))
        else:
            _render(report)
            if watch and report["stop_request_step"] is not None:
                console.print(
                    f"stop request written to {dump} (step {report['stop_request_step']})",
                    soft_wrap=True,
                )
        raise typer.Exit(report["exit_code"])
