"""What `tdump prune` prints: per layer and in total, channels, parameters and FLOPs
before and after, then the plan's notes.

Examples
--------
>>> _fmt(11_180_000), _fmt(950), _ratio(200, 50)
('11.18M', '950', '25.0%')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tdump.cli._console import console

__all__ = ["print_summary", "summarize"]


def summarize(
    before: Any,
    after: Any,
    plan: Any,
    input_shape: tuple[int, ...] | None,
    shape_source: str = "--input-shape",
    more: Sequence[tuple[Sequence[int], str]] = (),
) -> dict[str, Any]:
    """Per layer and total channels, parameters and FLOPs before/after (a JSON-able dict).

    See :func:`tdump.surgery._stats.prune_summary` (imported here, so that ``tdump
    --help`` does not import torch).
    """
    from tdump.surgery._stats import prune_summary

    return prune_summary(before, after, plan, input_shape, shape_source, more)


def _more_text(summary: dict[str, Any]) -> str:
    """``, and 1 int64`` for a ``forward(x, t)``'s other inputs the FLOPs were counted with."""
    more = summary.get("more_inputs") or []
    shown = [f"{'x'.join(map(str, m['shape'])) or 'scalar'} {m['dtype']}" for m in more]
    return f", and {', '.join(shown)}" if shown else ""


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _ratio(a: int | None, b: int | None) -> str:
    return f"{b / a:.1%}" if a and b is not None else "-"


def print_summary(summary: dict[str, Any], dry_run: bool, output: str | None, source: str) -> None:
    from rich.table import Table

    table = Table(title="dry run: nothing written" if dry_run else None, show_edge=False)
    pb, pa = summary["params_before"], summary["params_after"]
    fb, fa = summary["flops_before"], summary["flops_after"]
    rows = [
        (
            r["layer"],
            f"{r['channels_before']} -> {r['channels_after']}",
            f"{_fmt(r['params_before'])} -> {_fmt(r['params_after'])}",
            f"{_fmt(r['flops_before'])} -> {_fmt(r['flops_after'])}",
        )
        for r in summary["layers"]
    ]
    rows.append(
        (
            "total",
            # removing nothing prints 0, not -0
            f"-{summary['removed_channels']}" if summary["removed_channels"] else "0",
            f"{_fmt(pb)} -> {_fmt(pa)}",
            f"{_fmt(fb)} -> {_fmt(fa)}",
        )
    )
    # the numbers keep their width on a narrow terminal; long layer names are cut instead
    width = min(48, max(len(r[0]) for r in rows))
    table.add_column("layer", min_width=min(width, 20), overflow="ellipsis")
    for i, col in enumerate(("channels", "params", "FLOPs"), start=1):
        widest = max([len(col)] + [len(r[i]) for r in rows])
        table.add_column(col, justify="right", no_wrap=True, min_width=widest)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    shape = summary["input_shape"]
    f0, f1 = summary["filters_before"], summary["filters_after"]
    n_lin, l0, l1 = (
        summary[k] for k in ("linear_layers", "linear_features_before", "linear_features_after")
    )
    linear = (
        f", {l0 - l1} of {l0} features of {n_lin} Linear layer{'s' if n_lin > 1 else ''}"
        if n_lin
        else ""
    )
    console.print(
        f"{'would remove' if dry_run else 'removed'} {summary['removed_channels']} channels of "
        f"coupled groups = {f0 - f1} of {f0} conv filters ({(f0 - f1) / max(f0, 1):.1%}){linear} "
        f"and {_fmt(pb - pa)} of {_fmt(pb)} parameters ({(pb - pa) / max(pb, 1):.1%})",
        soft_wrap=True,
    )
    console.print(
        f"parameters {_ratio(pb, pa)} of {source}'s, FLOPs {_ratio(fb, fa)}"
        + (f" (input {'x'.join(map(str, shape))}{_more_text(summary)})" if shape else ""),
        soft_wrap=True,
    )
    for note in summary["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    if output:
        console.print(f"wrote {output}")
