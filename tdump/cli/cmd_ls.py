"""``tdump ls DUMP`` (alias ``tdump info``): what a dump holds.

Tensors with shapes, dtypes, saved records, bytes stored and logical, compression
ratio; steps per mode; collections. ``--json`` prints the dict of
:func:`tdump.analyze._info.summarize` (keys documented in ``docs/reading.md``).
"""

from __future__ import annotations

from typing import Any

import typer

from tdump.cli._help import TdumpCommand

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


#: Table columns: (name, justify, priority). Lower priority columns are hidden first
#: when the table does not fit the width; ``--json`` always has everything.
_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("tensor", "left", 9),
    ("mode", "left", 3),
    ("collection", "left", 5),
    ("shape", "left", 8),
    ("dtype", "left", 4),
    ("records", "right", 7),
    ("stored", "right", 6),
    ("logical", "right", 1),
    ("ratio", "right", 2),
    ("rank", "right", 3),
)
#: The tensor column keeps at least this many characters; longer names fold onto a second line.
_MIN_NAME = 24


def _rows(info: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for t in info["tensors"]:
        # bfloat16 is stored as float32 with zeroed low bytes (numpy has no bfloat16)
        dtype = "bfloat16" if t.get("storage_dtype") == "bfloat16" else t["dtype"]
        if t.get("source_dtype") and t["source_dtype"] != dtype:
            dtype = f"{dtype} ({t['source_dtype']})"
        rows.append(
            {
                "tensor": t["name"],
                "mode": t["mode"],
                "collection": str(t["collection"] or ""),
                "shape": "x".join(map(str, t["shape"])) or "scalar",
                "dtype": dtype,
                "records": str(t["records"]),
                "stored": _bytes(t["stored_bytes"]),
                "logical": _bytes(t["logical_bytes"]),
                "ratio": f"{t['ratio']:.2f}" if t["ratio"] else "-",
                "rank": str(t["rank"]),
            }
        )
    return rows


def fit_columns(rows: list[dict[str, str]], width: int | None, skip: set[str]) -> list[str]:
    """Columns to show: all but ``skip``, less the lowest-priority ones until ``width`` fits.

    >>> rows = [{"tensor": "layer1.0.relu.output_0", "mode": "train", "collection": "activations",
    ...          "shape": "4x64x8x8", "dtype": "float32", "records": "3", "stored": "12.0 KiB",
    ...          "logical": "24.0 KiB", "ratio": "2.00", "rank": "0"}]
    >>> fit_columns(rows, None, {"rank"})
    ['tensor', 'mode', 'collection', 'shape', 'dtype', 'records', 'stored', 'logical', 'ratio']
    >>> fit_columns(rows, 60, {"rank"})
    ['tensor', 'shape', 'records', 'stored']
    """
    cols = [name for name, _, _ in _COLUMNS if name not in skip]

    def need(name: str) -> int:
        natural = max([len(name)] + [len(r[name]) for r in rows])
        return min(natural, _MIN_NAME) if name == "tensor" else natural

    if width is None:
        return cols
    prio = {name: p for name, _, p in _COLUMNS}
    while len(cols) > 1 and sum(need(c) for c in cols) + 2 * (len(cols) - 1) > width:
        cols.remove(min(cols, key=lambda c: prio[c]))
    return cols


def table_lines(rows: list[dict[str, str]], cols: list[str], width: int | None) -> list[str]:
    """The table of ``rows`` as text lines: a header, then one line per row.

    Cells are padded to their column's width and joined by one space. The tensor column
    takes what ``width`` leaves (at least :data:`_MIN_NAME`); a longer name folds onto
    continuation lines. Written by hand rather than by rich's ``Table``, which took a
    second to lay out the 576 rows of a detector's dump.

    >>> rows = [{"tensor": "layer1.0.conv1.weight", "records": "3"},
    ...         {"tensor": "fc.bias", "records": "12"}]
    >>> print("\\n".join(table_lines(rows, ["tensor", "records"], None)))
    tensor                records
    layer1.0.conv1.weight       3
    fc.bias                    12
    >>> table_lines([{"tensor": "a" * 30, "records": "3"}], ["tensor", "records"], 32)[1:]
    ['aaaaaaaaaaaaaaaaaaaaaaaa       3', 'aaaaaa']
    """
    justify = {name: j for name, j, _ in _COLUMNS}
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
    if width is not None and "tensor" in widths:
        others = sum(w for c, w in widths.items() if c != "tensor") + len(cols) - 1
        widths["tensor"] = max(
            min(_MIN_NAME, widths["tensor"]), min(widths["tensor"], width - others)
        )

    def line(cells: dict[str, str]) -> str:
        parts = [
            cells[c].rjust(widths[c]) if justify[c] == "right" else cells[c].ljust(widths[c])
            for c in cols
        ]
        return " ".join(parts).rstrip()

    lines = [line({c: c for c in cols})]
    for r in rows:
        name = r.get("tensor", "")
        step = widths.get("tensor", len(name)) or 1
        lines.append(line({**r, "tensor": name[:step]}))
        for i in range(step, len(name), step):  # a name longer than its column folds
            lines.append(name[i : i + step].rstrip())
    return lines


def _render(info: dict[str, Any]) -> None:
    import os

    from tdump.cli._console import console

    # a terminal's width, or COLUMNS when set; piped without COLUMNS: never cut (scripts)
    width = console.width if console.is_terminal or os.environ.get("COLUMNS") else None
    out = console if width is not None else None
    if out is None:
        from rich.console import Console

        out = Console(file=console.file, width=1000, highlight=False)
    writers = ", ".join(sorted({str(r.get("writer")) for r in info["ranks"]}))
    out.print(
        f"[bold]{info['path']}[/]  {info['format']} v{info['format_version']}, written by "
        f"{writers or '?'}, ranks {', '.join(str(r['rank']) for r in info['ranks']) or 'none'}"
    )
    for mode, m in info["modes"].items():
        out.print(
            f"  {mode}: {m['records']} records, {m['examples']} examples, steps {_steps(m['steps'])}"
        )
    if not info["modes"]:
        out.print("  no committed records yet")
    rows = _rows(info)
    skip = set()
    if len(info["ranks"]) <= 1:
        skip.add("rank")
    if len({r["mode"] for r in rows}) <= 1 and width is not None and width < 120:
        skip.add("mode")  # one mode: the header line says which
    cols = fit_columns(rows, width, skip)
    if rows:
        header, *body = table_lines(rows, cols, width)
        out.print(header, style="bold", markup=False, highlight=False, soft_wrap=True)
        # one print: rich lays out a string once, not once per line
        out.print("\n".join(body), markup=False, highlight=False, soft_wrap=True)
    tot = info["totals"]
    ratio = f", ratio {tot['ratio']:.2f}" if tot["ratio"] else ""
    out.print(
        f"{tot['tensors']} tensors, {_bytes(tot['stored_bytes'])} stored "
        f"({_bytes(tot['logical_bytes'])} logical{ratio}); store {_bytes(tot['store_bytes'])} in all"
    )
    if info["collections"]:
        parts = [f"{k or '?'} ({len(v)})" for k, v in info["collections"].items()]
        out.print("collections: " + ", ".join(parts))
    hidden = [c for c, _, _ in _COLUMNS if c not in cols and c not in skip]
    if hidden and rows:
        out.print(f"(columns {', '.join(hidden)} hidden to fit {width} columns; --json has all)")


def ls(
    dump: str = typer.Argument(
        ..., metavar="DUMP", help="The dump: a path or an fsspec URL (file://, s3://, ...)."
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
    app.command("ls", cls=TdumpCommand)(ls)
    app.command("info", cls=TdumpCommand, help="Alias of `tdump ls`.")(ls)
