"""`tdump loop SCRIPT`: the iterative pruning loop, each stage its own process (docs/loop.md)."""

from __future__ import annotations

import json
import shlex
import time
from typing import TYPE_CHECKING, Any

import typer

from tdump.cli._console import abort, console, err_console
from tdump.cli._help import AFTER_DASHES, TdumpCommand
from tdump.cli._options import json_object_option, shape_option

if TYPE_CHECKING:
    from tdump.loop import LoopSettings

__all__ = ["register"]


class _LoopCommand(TdumpCommand):
    """An unknown option that is no near miss of the loop's own is likely the script's:
    the error says that the script's options go after ``--``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        rest: list[str] = []
        try:
            rest = super().parse_args(ctx, args)
        except Exception as exc:  # click's NoSuchOption, from whichever click typer runs on
            name = getattr(exc, "option_name", None)
            if (
                type(exc).__name__ != "NoSuchOption"
                or not name
                or getattr(exc, "possibilities", None)
            ):
                raise
            ctx.fail(
                f"No such option: {name} (if the training script takes {name}, put it "
                f"after --: tdump loop SCRIPT [OPTIONS] -- {name} ...)"
            )
        return rest


class _LiveEvents:
    """One line per stage, and a live table of rounds with the running stage's clock."""

    def __init__(self, live: Any, rows: list[dict[str, Any]]) -> None:
        self.live = live
        self.rows = list(rows)
        self.running: tuple[int, str, float] | None = None

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from tdump.cli.cmd_experiments import rounds_table

        parts: list[Any] = [rounds_table(self.rows)] if self.rows else []
        if self.running:
            r, stage, t0 = self.running
            parts.append(Text(f"round {r} {stage} ... {time.perf_counter() - t0:.0f} s"))
        return Group(*parts)

    def stage_started(self, r: int, stage: str, command: str | None) -> None:
        if command:
            self.live.console.print(f"[dim]$ {command}[/]", soft_wrap=True, highlight=False)
        self.running = (r, stage, time.perf_counter())
        self.live.refresh()

    def stage_finished(self, r: int, stage: str, seconds: float) -> None:
        self.running = None
        self.live.console.print(f"round {r} {stage:<8} {seconds:7.1f} s")
        self.live.refresh()

    def round_finished(self, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        self.rows = list(rows)
        self.live.refresh()

    def note(self, text: str) -> None:
        self.live.console.print(f"note: {text}", soft_wrap=True)

    def stage_note(self, r: int, stage: str, line: str) -> None:
        text = f"round {r} {stage}: {line}"
        if self.live.console.is_terminal and err_console.is_terminal:
            # one screen: through the live display's console, which lifts the table
            # first (rich writes err_console past the display, into the table)
            self.live.console.print(text, soft_wrap=True, markup=False)
        else:  # on stderr, where the stages print them (2>notes.txt keeps them)
            err_console.print(text, soft_wrap=True, markup=False)


def _given(ctx: typer.Context, param: str) -> bool:
    """Whether option ``param`` was given (on the command line or from the environment)."""
    if param == "train_args":  # given when `--` was, even with nothing after it (none)
        return ctx.meta.get(AFTER_DASHES) is not None or _given(ctx, "args")
    source = ctx.get_parameter_source(param)
    # by name: typer 0.28 has a copy of click of its own, whose enum is not click's
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _ignored_on_resume(
    ctx: typer.Context, given: LoopSettings, stored: dict[str, Any], finished: bool
) -> dict[str, str]:
    """``{setting: flag}`` for the options given with ``--resume`` that the stored settings override.

    An option counts when it was given (on the command line or from the environment,
    as the parameter source of ``ctx`` says), whatever its value: ``--rounds 3`` is as
    much ignored as ``--rounds 4`` when the experiment was started with 2. The options
    a resume replaces (``--stop-when``, ...) are not ignored, unless the experiment is
    ``finished`` (then nothing runs).
    """
    from tdump.loop._settings import RESUME_REPLACEABLE

    flags = {}
    for key, value in given.to_dict().items():
        if key in ("arch", "arch_kwargs") or (key in RESUME_REPLACEABLE and not finished):
            continue
        if value == stored.get(key) and not (finished and key in RESUME_REPLACEABLE):
            continue
        if not _given(ctx, key):
            continue  # a default (stop_checks: no option at all)
        if key == "script":
            if value:  # "": no SCRIPT before `--`
                flags[key] = str(value)
        elif key == "train_args":
            flags[key] = "-- " + " ".join(value)
        elif isinstance(value, bool):
            flags[key] = f"--{key.replace('_', '-')}"
        else:
            if isinstance(value, dict):
                shown = shlex.quote(json.dumps(value))
            elif isinstance(value, list):
                shown = ",".join(map(str, value))
            else:
                shown = shlex.quote(str(value))
            flags[key] = f"--{key.replace('_', '-')} {shown}"
    return flags


def _resume_note(experiment: str, ignored: dict[str, str], stored: dict[str, Any]) -> str:
    """The note for options ``--resume`` ignores (before the loop goes on)."""
    note = (
        f"note: --resume continues with the settings in {experiment}/experiment.json; "
        f"ignored: {' '.join(ignored.values())}"
    )
    if "rounds" in ignored:
        note += (
            f"; --rounds is fixed when an experiment starts ({experiment} has "
            f"{stored.get('rounds')})"
        )
    return note


def _further_note(experiment: str, stored: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """How to prune further than ``--rounds``, from the last round (said once it is done)."""
    last = (
        f"{experiment}/{rows[-1]['checkpoint']}"
        if rows
        else f"{experiment}/round_NNN/checkpoint.pt"
    )
    arch = f" --arch {stored['arch']}" if stored.get("arch") else ""
    return (
        "note: to prune further, start a new experiment from the last checkpoint: "
        f"tdump loop {'-m ' if stored.get('module') else ''}{stored.get('script')} --init "
        f"{last}{arch} ..."
    )


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""

    @app.command("loop", cls=_LoopCommand)
    def loop_cmd(
        ctx: typer.Context,
        script: str | None = typer.Argument(
            None, help="The training script (not needed with --resume)."
        ),
        args: list[str] = typer.Argument(
            None, help="TRAIN_ARGS after `--`; {init}, {out}, {round} are filled in."
        ),
        rounds: int = typer.Option(3, "--rounds", "-r", help="Rounds, round 0 included."),
        count: int | None = typer.Option(
            None, "--count", help="Channels to prune per round (per group with --scope per-layer)."
        ),
        ratio: float | None = typer.Option(
            None, "--ratio", help="Fraction of channels to prune per round."
        ),
        criterion: str = typer.Option("taylor", "--criterion", help="Ranking criterion."),
        scope: str = typer.Option("global", "--scope", help="global or per-layer."),
        min_channels: int = typer.Option(1, "--min-channels", help="Channels every layer keeps."),
        max_ratio: float | None = typer.Option(
            None, "--max-ratio", help="At most this fraction of a layer per round."
        ),
        conv_only_groups: bool = typer.Option(
            False, "--conv-only-groups", help="Leave residual groups alone."
        ),
        stop_when: str | None = typer.Option(
            None,
            "--stop-when",
            help="Stop condition, e.g. 'accuracy_drop > 0.10' (names: accuracy, accuracy_drop, "
            "params_ratio, flops_ratio, loss, round).",
        ),
        experiment: str | None = typer.Option(
            None, "--experiment", "-e", help="Experiment directory [experiments/<script>-<time>]."
        ),
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue the experiment from its last completed stage; --stop-when, "
            "--scheduler, --workers and TRAIN_ARGS given with it replace the stored ones.",
        ),
        init: str | None = typer.Option(None, "--init", help="Checkpoint round 0 starts from."),
        arch: str | None = typer.Option(
            None,
            "--arch",
            help="Model builder for a plain state_dict of round 0 [inferred from the dump for "
            "torchvision models]; with --resume: an import path again, or to add one.",
        ),
        arch_kwargs: str | None = typer.Option(
            None, "--arch-kwargs", help="JSON keyword arguments for --arch."
        ),
        include: str | None = typer.Option(
            None, "--include", help="What `tdump record` saves [its default]."
        ),
        interval: int | None = typer.Option(
            None,
            "--interval",
            help="Save every N train steps [10 when recording the criterion's reduction "
            "(taylor, apoz), else 100].",
        ),
        full_tensors: bool = typer.Option(
            False,
            "--full-tensors",
            help="Taylor criteria and apoz: record full tensors, not the ReLUs' reduction.",
        ),
        config: str | None = typer.Option(
            None,
            "--config",
            help="Hook settings for the train stage's `tdump record` (inline JSON or a "
            "JSON/YAML file), added to the loop's own.",
        ),
        input_shape: str | None = typer.Option(
            None, "--input-shape", help="Input shape for FLOPs, e.g. 3,32,32 [from the dump]."
        ),
        scheduler: str = typer.Option("threads", "--scheduler", help="Dask scheduler for rank."),
        workers: int | None = typer.Option(None, "--workers", help="Dask workers for rank."),
        mlflow: bool = typer.Option(
            False, "--mlflow", help="Log each round as an MLflow run (MLFLOW_TRACKING_URI)."
        ),
        module: str | None = typer.Option(
            None,
            "-m",
            "--module",
            metavar="MODULE",
            help="Train with library module MODULE, run as python -m does (from this "
            "folder), instead of SCRIPT.",
        ),
    ) -> None:
        """Train under capture -> rank -> prune -> fine-tune, round after round, as an experiment.

        Example: tdump loop train.py --rounds 5 --count 200 --stop-when 'accuracy_drop > 0.02' -- --out {out}
        """
        from pathlib import Path

        from rich.live import Live

        from tdump.capture._config import load_config
        from tdump.errors import ConfigError, LoopError
        from tdump.loop import Experiment, LoopSettings, run_loop
        from tdump.loop._settings import RESUME_REPLACEABLE

        kwargs = json_object_option(arch_kwargs, "--arch-kwargs")
        record_config = load_config(config) if config else None
        shape = list(shape_option(input_shape, example="3,32,32")) if input_shape else None
        if resume and experiment is None:
            raise ConfigError("--resume needs --experiment DIR (the experiment to continue)")
        resuming = resume and Experiment.is_experiment(experiment or "")
        after = ctx.meta.get(AFTER_DASHES)
        if module is not None and script is not None and after and after[:1] == [script]:
            script = None  # no SCRIPT before `--`: click took TRAIN_ARGS' first word
            args = after
        if module is not None and script is not None:
            raise ConfigError(
                f"give the training script ({script}) or -m MODULE ({module}), not both"
            )
        if module is not None and not module.strip():
            raise ConfigError("-m needs a module name after it, e.g. -m mypkg.train")
        if module is not None:
            script = module
        if resume and not resuming and script is None:
            raise ConfigError(
                f"no experiment to resume at {experiment} (no experiment.json there); check "
                "--experiment, or start one: tdump loop TRAIN.py --rounds N --count C"
            )
        if not resuming and script is None:
            raise ConfigError("name the training script: tdump loop TRAIN.py --rounds N --count C")
        train_args = list(args or [])
        if train_args[:1] == ["--"]:
            train_args = train_args[1:]
        if resume and script is not None and after and after == [script, *train_args]:
            # no SCRIPT before `--` (a resume needs none): click took TRAIN_ARGS' first word
            script, train_args = None, after
        settings = LoopSettings(
            script=script or "",
            train_args=train_args,
            rounds=rounds,
            count=count,
            ratio=ratio,
            criterion=criterion,
            scope=scope,
            min_channels=min_channels,
            max_ratio=max_ratio,
            conv_only_groups=conv_only_groups,
            stop_when=stop_when,
            init=init,
            arch=arch,
            arch_kwargs=kwargs,
            include=include,
            interval=interval,
            full_tensors=full_tensors,
            config=record_config,
            input_shape=shape,
            scheduler=scheduler,
            workers=workers,
            mlflow=mlflow,
            module=module is not None,
        )
        if experiment is None:
            stem = module.rsplit(".", 1)[-1] if module else Path(script or "train").stem
            experiment = f"experiments/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not resuming:
            settings.check()
        console.print(f"experiment: {experiment}", soft_wrap=True)
        prior: list[dict[str, Any]] = []
        ignored: dict[str, str] = {}
        stored: dict[str, Any] = {}
        done = False  # finished before this run (the loop's note says how to go on)
        if resuming:
            resumed = Experiment.open(experiment)
            prior, stored = resumed.rows(), resumed.settings
            done = bool(prior and prior[-1].get("stop_reason"))
            ignored = _ignored_on_resume(ctx, settings, stored, done)
            if ignored:
                note = _resume_note(experiment, ignored, stored)
                console.print(note, soft_wrap=True, markup=False)
        replace = [k for k in RESUME_REPLACEABLE if resuming and _given(ctx, k)]
        with Live(console=console, refresh_per_second=1, transient=True) as live:
            events = _LiveEvents(live, prior)
            live.update(events)
            try:
                rows = run_loop(settings, experiment, resume=resume, events=events, replace=replace)  # type: ignore[arg-type]
            except LoopError as exc:
                live.stop()
                abort(str(exc), code=exc.exit_code)
            except KeyboardInterrupt:
                live.stop()
                abort(
                    f"interrupted; continue with tdump loop --resume --experiment {experiment}",
                    code=130,
                )
        from tdump.cli.cmd_experiments import rounds_table

        ended = Experiment.open(experiment)  # its settings now: a resume may have added --arch
        final = ended.state()
        reason = rows[-1].get("stop_reason") if rows else None
        console.print(rounds_table(rows))
        console.print(
            f"stopped after round {rows[-1]['round']}: {reason or final.get('status')}"
            if rows
            else "no round completed",
            soft_wrap=True,
        )
        if "rounds" in ignored and not done:  # now: the run may have completed more rounds
            note = _further_note(experiment, ended.settings, rows)
            console.print(note, soft_wrap=True, markup=False)
        console.print(
            f"table: tdump experiments show {experiment}   figure: tdump experiments plot {experiment} -o curve.png",
            soft_wrap=True,
        )
