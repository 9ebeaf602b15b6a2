"""`tdump loop SCRIPT`: the iterative pruning loop, each stage its own process (docs/loop.md)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer

from tdump.cli._console import abort, console
from tdump.cli._help import TdumpCommand
from tdump.cli._options import json_object_option, shape_option

if TYPE_CHECKING:
    from tdump.loop import LoopSettings

__all__ = ["register"]


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


def _ignored_on_resume(given: LoopSettings, stored: dict[str, Any]) -> str:
    """The options given with ``--resume`` that differ from the stored settings, as flags."""
    from tdump.loop import LoopSettings

    defaults = LoopSettings(script="").to_dict()
    flags = []
    for key, value in given.to_dict().items():
        if key in ("arch", "arch_kwargs") or value == defaults[key] or value == stored.get(key):
            continue
        if key == "script":
            flags.append(str(value))
        elif key == "train_args":
            flags.append("-- " + " ".join(value))
        elif isinstance(value, bool):
            flags.append(f"--{key.replace('_', '-')}")
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            flags.append(f"--{key.replace('_', '-')} {shown}")
    return " ".join(flags)


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""

    @app.command("loop", cls=TdumpCommand)
    def loop_cmd(
        script: str = typer.Argument(None, help="The training script (not needed with --resume)."),
        args: list[str] = typer.Argument(
            None, help="TRAIN_ARGS after `--`; {init}, {out}, {round} are filled in."
        ),
        rounds: int = typer.Option(3, "--rounds", "-r", help="Rounds, round 0 included."),
        count: int | None = typer.Option(None, "--count", help="Channels to prune per round."),
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
            False, "--resume", help="Continue the experiment from its last completed stage."
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
        interval: int = typer.Option(100, "--interval", help="Save every N train steps."),
        full_tensors: bool = typer.Option(
            False,
            "--full-tensors",
            help="Taylor criteria: record full tensors, not just the ReLUs' Taylor term.",
        ),
        input_shape: str | None = typer.Option(
            None, "--input-shape", help="Input shape for FLOPs, e.g. 3,32,32 [from the dump]."
        ),
        scheduler: str = typer.Option("threads", "--scheduler", help="Dask scheduler for rank."),
        workers: int | None = typer.Option(None, "--workers", help="Dask workers for rank."),
        mlflow: bool = typer.Option(
            False, "--mlflow", help="Log each round as an MLflow run (MLFLOW_TRACKING_URI)."
        ),
    ) -> None:
        """Train under capture -> rank -> prune -> fine-tune, round after round, as an experiment.

        Example: tdump loop train.py --rounds 5 --count 200 --stop-when 'accuracy_drop > 0.02' -- --out {out}
        """
        from pathlib import Path

        from rich.live import Live

        from tdump.errors import ConfigError, LoopError
        from tdump.loop import Experiment, LoopSettings, run_loop

        kwargs = json_object_option(arch_kwargs, "--arch-kwargs")
        shape = list(shape_option(input_shape, example="3,32,32")) if input_shape else None
        if resume and experiment is None:
            raise ConfigError("--resume needs --experiment DIR (the experiment to continue)")
        resuming = resume and Experiment.is_experiment(experiment or "")
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
            input_shape=shape,
            scheduler=scheduler,
            workers=workers,
            mlflow=mlflow,
        )
        if experiment is None:
            stem = Path(script or "train").stem
            experiment = f"experiments/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not resuming:
            settings.check()
        console.print(f"experiment: {experiment}", soft_wrap=True)
        prior: list[dict[str, Any]] = []
        if resuming:
            resumed = Experiment.open(experiment)
            prior = resumed.rows()
            ignored = _ignored_on_resume(settings, resumed.settings)
            if ignored:
                console.print(
                    f"note: --resume continues with the settings in {experiment}/experiment.json; "
                    f"ignored: {ignored}",
                    soft_wrap=True,
                )
        with Live(console=console, refresh_per_second=1, transient=True) as live:
            events = _LiveEvents(live, prior)
            live.update(events)
            try:
                rows = run_loop(settings, experiment, resume=resume, events=events)  # type: ignore[arg-type]
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

        final = Experiment.open(experiment).state()
        reason = rows[-1].get("stop_reason") if rows else None
        console.print(rounds_table(rows))
        console.print(
            f"stopped after round {rows[-1]['round']}: {reason or final.get('status')}"
            if rows
            else "no round completed",
            soft_wrap=True,
        )
        console.print(
            f"table: tdump experiments show {experiment}   figure: tdump experiments plot {experiment} -o curve.png",
            soft_wrap=True,
        )
