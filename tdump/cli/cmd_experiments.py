"""`tdump experiments show|plot|compare`: read experiment directories written by `tdump loop`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tdump.cli._console import console
from tdump.cli._help import TdumpCommand

__all__ = ["register", "rounds_table"]


def _num(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _acc(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def rounds_table(rows: list[dict[str, Any]], title: str | None = None) -> Any:
    """A rich Table of rounds.jsonl rows (shared with `tdump loop`'s live view).

    Narrow enough for 80 columns; the stop reason is printed under the table.
    """
    from rich.table import Table

    table = Table(title=title, show_edge=False, pad_edge=False)
    for col in (
        "round",
        "params",
        "FLOPs",
        "%par",
        "acc",
        "drop",
        "train",
        "loss",
        "cut",
        "wall",
    ):  # drop: points lost vs round 0; train: train accuracy; cut: channels removed; wall: s
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        wall = sum(float(v) for v in (r.get("wall") or {}).values())
        drop = r.get("accuracy_drop")
        table.add_row(
            str(r["round"]),
            _num(r.get("params")),
            _num(r.get("flops")),
            f"{100 * r['params_ratio']:.1f}" if r.get("params_ratio") is not None else "-",
            _acc(r.get("accuracy")),
            "-" if drop is None else f"{100 * float(drop):+.1f}",
            _acc(r.get("train_accuracy")),
            "-" if r.get("loss") is None else f"{float(r['loss']):.3f}",
            "-" if r.get("removed") is None else str(r["removed"]),
            f"{wall:.0f}",
        )
    return table


def _load(path: Path) -> tuple[Any, list[dict[str, Any]]]:
    from tdump.loop import Experiment

    exp = Experiment.open(path)
    return exp, exp.rows()


def _alive(pid: Any) -> bool:
    """Whether process ``pid`` still exists (a loop killed with SIGKILL leaves "running")."""
    import os

    if not isinstance(pid, int) or pid <= 0:
        return True  # nothing to check: believe the state
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _status_line(experiment: Path, state: dict[str, Any]) -> str:
    """``status: ...`` with what to do next when the loop was interrupted or killed."""
    status = state.get("status") or "not started"
    line = f"status: {status}"
    if state.get("stop_reason"):
        line += f" ({state['stop_reason']})"
    if state.get("error"):
        line += f": {state['error']}"
    resume = f"continue with tdump loop --resume --experiment {experiment}"
    running = state.get("running")
    if status == "interrupted":
        stage = state.get("interrupted")
        where = f" in round {state.get('round')} {stage}" if stage else ""
        line += f" (Ctrl-C{where}); {resume}"
    elif status == "running" and running:
        if running.get("stage") == "resume":  # a resumed loop checking its settings
            line += f"; resuming (process {running.get('pid')})"
        else:
            line += f"; round {state.get('round')} {running.get('stage')}"
        if _alive(running.get("pid")):
            line += " in progress"
        else:
            line += f" was killed (process {running.get('pid')} is gone); {resume}"
    return line


def _show(experiment: Path, as_json: bool) -> None:
    exp, rows = _load(experiment)
    state = exp.state()
    if as_json:
        out = {
            "experiment": str(experiment),
            "status": state.get("status"),
            "stop_reason": state.get("stop_reason"),
            "error": state.get("error"),
            "settings": exp.settings,
            "rounds": rows,
        }
        typer.echo(json.dumps(out))
        return
    s = exp.settings
    console.print(
        f"{experiment}: {s.get('script')} {' '.join(s.get('train_args') or [])}".rstrip(),
        soft_wrap=True,
    )
    console.print(rounds_table(rows))
    for r in rows:
        if r.get("stop_reason"):
            console.print(
                f"round {r['round']} stopped the loop: {r['stop_reason']}", soft_wrap=True
            )
    console.print(_status_line(experiment, state), soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``experiments`` command group to ``app``."""
    group = typer.Typer(
        help="Show, plot and compare experiments written by `tdump loop`.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )

    @group.command("show", cls=TdumpCommand)
    def show_cmd(
        experiments: list[Path] = typer.Argument(
            ..., help="Experiment directories (a shell glob such as experiments/train-* works)."
        ),
        as_json: bool = typer.Option(
            False,
            "--json",
            help="Print state and rows as JSON (one object per line and experiment).",
        ),
    ) -> None:
        """Print the table of rounds and where the loop stands, for each experiment."""
        for i, experiment in enumerate(experiments):
            if i and not as_json:
                console.print()
            _show(experiment, as_json)

    @group.command("plot", cls=TdumpCommand)
    def plot_cmd(
        experiment: Path = typer.Argument(..., help="Experiment directory."),
        out: Path = typer.Option(Path("curve.png"), "-o", "--out", help="Figure to write."),
    ) -> None:
        """Draw parameters vs accuracy (one labelled point per round), accuracy and parameters per round."""
        from tdump.loop._plot import plot_rounds

        _, rows = _load(experiment)
        plot_rounds([(experiment.name, rows)], out, title=str(experiment))
        console.print(f"wrote {out}")

    @group.command("compare", cls=TdumpCommand)
    def compare_cmd(
        experiments: list[Path] = typer.Argument(
            ..., help="Experiment directories (one or more; several share one figure)."
        ),
        out: Path = typer.Option(Path("compare.png"), "-o", "--out", help="Figure to write."),
    ) -> None:
        """Put several experiments on one figure (taylor vs l1, say) and print their tables."""
        from tdump.loop._plot import plot_rounds

        loaded = [(p.name, _load(p)[1]) for p in experiments]
        for p, (_, rows) in zip(experiments, loaded, strict=True):
            console.print(rounds_table(rows, title=str(p)))
        plot_rounds(loaded, out, title=" vs ".join(name for name, _ in loaded))
        console.print(f"wrote {out}")

    app.add_typer(group, name="experiments")
