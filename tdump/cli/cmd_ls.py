"""``tdump ls DUMP`` (alias ``tdump info``): what a dump holds.

Tensors with shapes, dtypes, saved records, bytes stored and logical, compression
ratio; steps per mode; collections. ``--json`` prints the dict of
:func:`tdump.analyze._info.summarize` (keys documented in ``docs/reading.md``).
"""

from __future__ import annotations

from typing import Any

import typer

__all__ = ["register"]


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, {steps[2]} ... {steps[-1]}"


def _render(info: dict[str, Any]) -> None:
    from rich.table import Table

    from tdump.cli._console import console

    writers = ", ".join(sorted({str(r.get("writer")) for r in info["ranks"]}))
    console.print(
        f"[bold]{info['path']}[/]  {info['format']} v{info['format_version']}, written by "
        f"{writers or '?'}, ranks {', '.join(str(r['rank']) for r in info['ranks']) or 'none'}",
        soft_wrap=True,
    )
    for mode, m in info["modes"].items():
        console.print(
            f"  {mode}: {m['records']} records, {m['examples']} examples, steps {_steps(m['steps'])}",
            soft_wrap=True,
        )
    if not info["modes"]:
        console.print("  no committed records yet")
    multi_rank = len(info["ranks"]) > 1
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in (
        ("tensor", "left"),
        ("mode", "left"),
        ("collection", "left"),
        ("shape", "left"),
        ("dtype", "left"),
        ("records", "right"),
        ("stored", "right"),
        ("logical", "right"),
        ("ratio", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    if multi_rank:
        table.add_column("rank", justify="right")
    for t in info["tensors"]:
        dtype = t["dtype"]
        if t.get("source_dtype") and t["source_dtype"] != dtype:
            dtype = f"{dtype} ({t['source_dtype']})"
        row = [
            t["name"],
            t["mode"],
            str(t["collection"] or ""),
            "x".join(map(str, t["shape"])) or "scalar",
            dtype,
            str(t["records"]),
            _bytes(t["stored_bytes"]),
            _bytes(t["logical_bytes"]),
            f"{t['ratio']:.2f}" if t["ratio"] else "-",
        ]
        if multi_rank:
            row.append(str(t["rank"]))
        table.add_row(*row)
    if info["tensors"]:
        # never truncate names when piped (rich would assume 80 columns)
        if console.is_terminal:
            console.print(table)
        else:
            from rich.console import Console

            Console(file=console.file, width=1000, highlight=False).print(table)
    tot = info["totals"]
    ratio = f", ratio {tot['ratio']:.2f}" if tot["ratio"] else ""
    console.print(
        f"{tot['tensors']} tensors, {_bytes(tot['stored_bytes'])} stored "
        f"({_bytes(tot['logical_bytes'])} logical{ratio}); store {_bytes(tot['store_bytes'])} in all",
        soft_wrap=True,
    )
    if info["collections"]:
        parts = [f"{k or '?'} ({len(v)})" for k, v in info["collections"].items()]
        console.print("collections: " + ", ".join(parts), soft_wrap=True)


def ls(
    dump: str = typer.Argument(
        ..., help="The dump: a path or an fsspec URL (file://, s3://, ...)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (stable keys)."),
    mode: str | None = typer.Option(
        None, "--mode", metavar="MODE", help="Only this mode (train, eval, ...)."
    ),
    rank: int | None = typer.Option(
        None, "--rank", metavar="R", help="Only this DDP rank (default: all)."
    ),
    match: str | None = typer.Option(
        None,
        "--match",
        "-m",
        metavar="REGEX",
        help="Only tensors whose name matches this regex (re.search).",
    ),
) -> None:
    """List the tensors, steps, sizes and collections of a dump."""
    import json

    from tdump.analyze._info import summarize

    info = summarize(dump, rank=rank, mode=mode, regex=match)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        _render(info)


def register(app: typer.Typer) -> None:
    """Add ``ls`` and its alias ``info`` to ``app``."""
    app.command("ls")(ls)
    app.command("info", help="Alias of `tdump ls`.")(ls)
