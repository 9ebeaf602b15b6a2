"""The seed's figure for one experiment or several (matplotlib: the ``plot`` extra).

Left: parameters vs accuracy, one labelled point per round (the seed's curve).
Middle and right: accuracy and parameters per round.

Examples
--------
>>> rows = [{"round": 0, "params": 11_200_000, "accuracy": 0.91},
...         {"round": 1, "params": 3_500_000, "accuracy": 0.91}]
>>> plot_rounds([("taylor", rows)], "curve.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tdump.errors import ConfigError

__all__ = ["plot_rounds"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'tdump[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_out(out: str) -> None:
    """Refuse, before drawing, a path matplotlib cannot write (a folder, an unknown suffix)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if os.path.isdir(out):
        raise ConfigError(
            f"{out} is a directory; give a file name, e.g. {os.path.join(out, 'curve.png')}"
        )
    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(out)[1].lstrip(".").lower()
    if suffix not in kinds:
        found = f"suffix '.{suffix}'" if suffix else "no suffix"
        raise ConfigError(
            f"cannot write a figure to {out} ({found}); the suffix picks the format: "
            + ", ".join(f".{k}" for k in ("png", "svg", "pdf") if k in kinds)
            + f" (or {', '.join('.' + k for k in sorted(kinds) if k not in ('png', 'svg', 'pdf'))})"
        )


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def plot_rounds(
    experiments: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> str:
    """Draw the experiments' rounds into ``out`` (PNG, SVG or PDF by suffix); returns ``out``.

    ``experiments`` is ``[(label, rows), ...]`` with rows as in rounds.jsonl.
    Rounds without an accuracy are left out of the accuracy panels.
    """
    plt = _pyplot()
    _check_out(os.fspath(out))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    curve, acc_ax, par_ax = axes
    for label, rows in experiments:
        rounds = [int(r["round"]) for r in rows]
        params = [float(r["params"]) for r in rows]
        scored = [r for r in rows if r.get("accuracy") is not None]
        line = curve.plot(
            [r["params"] for r in scored], [r["accuracy"] for r in scored], "o-", label=label
        )[0]
        for r in scored:
            curve.annotate(
                f"{r['round']}: {_millions(r['params'])}/{r['accuracy']:.2f}",
                (r["params"], r["accuracy"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
                color=line.get_color(),
            )
        acc_ax.plot(
            [r["round"] for r in scored], [r["accuracy"] for r in scored], "o-", label=label
        )
        par_ax.plot(rounds, params, "o-", label=label)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    curve.invert_xaxis()  # pruning goes right: fewer parameters
    curve.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _millions(v)))
    par_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _millions(v)))
    par_ax.set_ylim(bottom=0)
    for ax in (acc_ax, par_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set_xlabel("parameters")
    curve.set_ylabel("validation accuracy")
    curve.set_title("accuracy vs parameters, one point per round")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.set_title("accuracy per round")
    par_ax.set_xlabel("round")
    par_ax.set_ylabel("parameters")
    par_ax.set_title("parameters per round")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if len(experiments) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(out)}.partial{os.path.splitext(out)[1]}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
