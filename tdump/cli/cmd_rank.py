"""`tdump rank DUMP`: rank conv filters from a dump with Dask and write ranks.parquet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tdump.cli._help import TdumpCommand

__all__ = ["register"]


class _RankCommand(TdumpCommand):
    def extra_hint(self, words: list[str]) -> str | None:
        """``tdump rank run.zarr taylor``: the criterion and the output are options.

        >>> hint = _RankCommand(name="rank").extra_hint
        >>> hint(["l1"]), hint(["out.parquet"])
        ('the criterion is an option: --criterion l1', 'the output is an option: --out out.parquet')
        """
        if len(words) != 1:
            return None
        word = words[0]
        if word.endswith(".parquet"):
            return f"the output is an option: --out {word}"
        if Path(word).exists():
            return "tdump rank ranks one DUMP: run it once per dump, each with its own --out"
        if word.replace("-", "_").isidentifier():
            return f"the criterion is an option: --criterion {word}"
        return None


def register(app: typer.Typer) -> None:
    """Add the ``rank`` command to ``app``."""

    @app.command("rank", cls=_RankCommand)
    def rank_cmd(
        dump: str = typer.Argument(
            ..., metavar="DUMP", help="Dump path or fsspec URL (file://, s3://, ...)."
        ),
        out: str = typer.Option(
            "ranks.parquet",
            "-o",
            "--out",
            "--output",
            metavar="PATH",
            help="Where to write the ranks, beside the dump (checked before ranking; an "
            "existing ranks file is replaced atomically, any other file is refused).",
        ),
        criterion: str = typer.Option(
            "taylor",
            "--criterion",
            "-c",
            metavar="NAME",
            help="taylor, taylor-signed, l1, bn-gamma, apoz, taylor-weight (or a plug-in).",
        ),
        mode: str = typer.Option(
            "train", "--mode", metavar="MODE", help="Store mode whose steps are used."
        ),
        steps: str | None = typer.Option(
            None,
            "--steps",
            metavar="RANGE",
            help="Saved steps START:STOP (stop exclusive), START:, :STOP, STEP, or "
            "START:STOP:K (step numbers START, START+K, ...).",
        ),
        layers: str | None = typer.Option(
            None,
            "--layers",
            metavar="REGEX",
            help="Regex on layer paths: convs, hidden Linears (re.search).",
        ),
        signed: bool = typer.Option(False, "--signed", help="Signed Taylor variant (no abs)."),
        no_normalize: bool = typer.Option(
            False, "--no-normalize", help="Skip the layer-wise L2 normalisation."
        ),
        scheduler: str = typer.Option(
            "threads",
            "--scheduler",
            metavar="NAME|ADDRESS",
            help="threads, processes, sync, or tcp://host:8786.",
        ),
        timeout: float = typer.Option(
            10.0,
            "--timeout",
            metavar="SECONDS",
            help="How long a scheduler address gets to answer before a one-line error.",
        ),
        workers: int | None = typer.Option(
            None, "--workers", metavar="N", help="Worker threads/processes."
        ),
        memory_limit: str | None = typer.Option(
            None,
            "--memory-limit",
            metavar="SIZE",
            help="Per-worker memory limit, e.g. 2GB (processes).",
        ),
        keep_nan: bool = typer.Option(
            False, "--keep-nan", help="Keep records holding NaN/Inf (their layers score NaN)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Rank every conv filter and hidden Linear feature of DUMP; write a ranks.parquet.

        The file's format: docs/FORMAT.md §2.
        """
        import warnings

        from tdump._preload import preload

        # dask's import (0.1 s; 0.3 s from a cold page cache) overlaps zarr's and the planning
        preload("dask", "dask.threaded", "dask.delayed", "dask.callbacks")
        from tdump._protocols import require_protocol
        from tdump.analyze import rank_table, write_ranks
        from tdump.analyze._paths import check_output_path
        from tdump.cli._console import console, err_console
        from tdump.errors import NonFiniteWarning

        require_protocol(out)  # before the ranking, not after it
        # a bad --out fails now, not after the ranking; it never replaces a file that is not
        # a ranks file (a checkpoint typed as -o) nor lands inside the dump (deleted with it)
        check_output_path(out, dump=dump, only_ranks=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonFiniteWarning)
            table = rank_table(  # numpy columns: this command never imports pandas
                dump,
                criterion=criterion,
                mode=mode,
                steps=steps,
                layers=layers,
                normalize=not no_normalize,
                signed=signed,
                scheduler=scheduler,
                workers=workers,
                memory_limit=memory_limit,
                progress=not (quiet or as_json),
                connect_timeout=timeout,
                keep_nan=keep_nan,
            )
        for w in caught:  # one line each on stderr, whatever the output mode
            if issubclass(w.category, NonFiniteWarning):
                err_console.print(f"warning: {w.message}", soft_wrap=True)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        path = write_ranks(table, out)
        cols, meta = table.columns, table.meta
        weakest = table.weakest(10)
        n_layers = len(set(cols["layer"]))
        if as_json:
            summary = {
                "ranks": path,
                "criterion": meta["criterion"],
                "mode": meta["mode"],
                "steps": meta["steps"],
                "layers": n_layers,
                "filters": len(table),
                "notes": list(meta.get("notes") or []),
                "weakest": [
                    {
                        "layer": str(cols["layer"][i]),
                        "channel": int(cols["channel"][i]),
                        "score_norm": float(cols["score_norm"][i]),
                    }
                    for i in weakest
                ],
            }
            typer.echo(json.dumps(summary))
            return
        for note in meta.get("notes") or []:  # layers left without scores, one saved step
            err_console.print(f"note: {note}", soft_wrap=True)
        first, last = meta["steps"]
        saved = int(cols["steps"].max())
        console.print(
            f"ranked {_counted(cols['layer'], meta.get('linear_layers') or [])} by "
            f"{meta['criterion']} ({mode} steps {first}..{last}, "
            f"{saved} saved step{'' if saved == 1 else 's'})",
            soft_wrap=True,
        )
        linears = set(meta.get("linear_layers") or [])
        console.print(f"{_weakest_title([str(cols['layer'][i]) for i in weakest], linears)}:")
        for i in weakest:
            console.print(
                f"  {cols['layer'][i]:<28} channel {int(cols['channel'][i]):>4}   "
                f"score_norm {cols['score_norm'][i]:.4g}",
                soft_wrap=True,
            )
        console.print(f"ranks written to {path}", soft_wrap=True)
        if not str(out).endswith(".parquet"):  # `-o ranks.csv` still writes Parquet
            err_console.print(
                f"note: {out} holds Parquet (docs/FORMAT.md §2), whatever its suffix; "
                "for CSV: tdump.analyze.read_ranks(PATH).to_csv(...)",
                soft_wrap=True,
            )


def _weakest_title(layers: list[str], linears: set[str]) -> str:
    """Name the listed rows for what they are: conv filters, Linear features, or both.

    >>> _weakest_title(["c", "c"], set())
    '2 weakest filters'
    >>> _weakest_title(["fc"] * 10, {"fc"})
    '10 weakest features'
    >>> _weakest_title(["c", "fc"], {"fc"})
    '2 weakest channels'
    """
    n_linear = sum(layer in linears for layer in layers)
    what = "filters" if not n_linear else "features" if n_linear == len(layers) else "channels"
    return f"{len(layers)} weakest {what}"


def _counted(layer_col: Any, linears: list[str]) -> str:
    """``"3904 filters in 17 conv layers"``, plus the hidden Linears' features when ranked.

    >>> _counted(["c", "c", "fc", "fc", "fc"], ["fc"])
    '2 filters in 1 conv layer and 3 features of 1 Linear layer'
    >>> _counted(["fc", "fc"], ["fc"])  # a ViT: its MLPs alone
    '2 features of 1 Linear layer'
    """
    lin = set(linears)
    rows = [str(x) for x in layer_col]
    conv_rows = [r for r in rows if r not in lin]
    lin_rows = len(rows) - len(conv_rows)

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    convs = f"{plural(len(conv_rows), 'filter')} in {plural(len(set(conv_rows)), 'conv layer')}"
    if not lin_rows:
        return convs
    feats = (
        f"{plural(lin_rows, 'feature')} of "
        f"{plural(len(set(rows) - set(conv_rows)), 'Linear layer')}"
    )
    return f"{convs} and {feats}" if conv_rows else feats
