"""`tdump prune CKPT RANKS`: write a checkpoint without the lowest-ranked filters.

CKPT may be the previous round's fine-tuned state_dict (``--like`` the previous
round's tdump checkpoint). torch is imported inside the command so ``tdump --help``
stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tdump.cli._console import console
from tdump.cli._help import TdumpCommand
from tdump.cli._options import json_object_option, shape_option
from tdump.errors import ConfigError

__all__ = ["register", "summarize"]


def _parse_shape(text: str | None, model: Any, dump: str | None = None) -> tuple[int, ...]:
    """``--input-shape``, else the recorded input's (from the dump), else 224x224."""
    if text:
        return shape_option(text, example="3,224,224")
    if dump is not None:
        from tdump.surgery._input_shape import recorded_input_shape

        try:
            shape = recorded_input_shape(dump)
        except Exception:  # a dump we cannot read only means no inference
            shape = None
        if shape:
            return tuple(shape)
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = int(first.in_channels) if first is not None else 3
    return (channels, 224, 224)


def summarize(
    before: Any, after: Any, plan: Any, input_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """Per layer and total channels, parameters and FLOPs before/after (a JSON-able dict).

    FLOPs need one forward pass of ``before`` at ``input_shape`` (batch excluded); if
    it fails, FLOPs are reported as ``None`` with a note.
    """
    from tdump.surgery import count_params, layer_flops, layer_params, output_positions

    notes = list(plan.notes)
    try:
        positions = output_positions(before, input_shape) if input_shape else None
    except Exception as exc:
        positions = None
        notes.append(
            f"FLOPs not computed: forward at input shape {list(input_shape or ())} failed ({str(exc).splitlines()[0][:100]})"
        )
    p0, p1 = layer_params(before), layer_params(after)
    filters0 = _filters(before)
    f0 = layer_flops(before, positions) if positions else {}
    f1 = layer_flops(after, positions) if positions else {}
    mods0, mods1 = dict(before.named_modules()), dict(after.named_modules())
    rows = []
    for name, n0 in p0.items():
        if p1.get(name) == n0 and name not in plan.layers:
            continue
        m0, m1 = mods0[name], mods1[name]
        attr = "out_channels" if hasattr(m0, "out_channels") else "in_features"
        rows.append(
            {
                "layer": name,
                "channels_before": int(getattr(m0, attr)),
                "channels_after": int(getattr(m1, attr)),
                "params_before": n0,
                "params_after": p1.get(name, 0),
                "flops_before": f0.get(name),
                "flops_after": f1.get(name),
            }
        )
    return {
        "removed_channels": plan.removed,
        "removed_filters": filters0 - _filters(after),  # depthwise convs that follow included
        "filters_before": filters0,
        "filters_after": _filters(after),
        "params_before": count_params(before),
        "params_after": count_params(after),
        "flops_before": sum(f0.values()) if positions else None,
        "flops_after": sum(f1.values()) if positions else None,
        "input_shape": list(input_shape) if input_shape else None,
        "layers": rows,
        "notes": notes,
    }


def _filters(model: Any) -> int:
    from torch import nn

    return sum(
        int(m.out_channels) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
    )


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _ratio(a: int | None, b: int | None) -> str:
    return f"{b / a:.1%}" if a and b is not None else "-"


def _print(summary: dict[str, Any], dry_run: bool, output: str | None, source: str) -> None:
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
            f"-{summary['removed_channels']}",
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
    console.print(
        f"{'would remove' if dry_run else 'removed'} {summary['removed_channels']} channels of "
        f"coupled groups = {f0 - f1} of {f0} conv filters ({(f0 - f1) / max(f0, 1):.1%}) "
        f"and {_fmt(pb - pa)} of {_fmt(pb)} parameters ({(pb - pa) / max(pb, 1):.1%})",
        soft_wrap=True,
    )
    console.print(
        f"parameters {_ratio(pb, pa)} of {source}'s, FLOPs {_ratio(fb, fa)}"
        + (f" (input {'x'.join(map(str, shape))})" if shape else ""),
        soft_wrap=True,
    )
    for note in summary["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    if output:
        console.print(f"wrote {output}")


def _check_order(ckpt: Path, ranks: Path) -> None:
    """A ranks file given as CKPT and a checkpoint as RANKS: say so, not 'not parquet'."""
    heads = []
    for path in (ckpt, ranks):
        try:
            with open(path, "rb") as fh:
                heads.append(fh.read(4))
        except OSError:
            return
    if heads[0] == b"PAR1" and heads[1] != b"PAR1":
        raise ConfigError(
            f"{ckpt} is a ranks file: the checkpoint comes first, "
            f"`tdump prune CKPT RANKS` (here: tdump prune {ranks} {ckpt} ...)"
        )


def _recorded_dump(table: Any, dump: Path | None) -> str | None:
    """``--dump``, else the dump the ranks file names if it is a local folder still there."""
    if dump is not None:
        return str(dump)
    where = (table.attrs.get("tdump") or {}).get("dump")
    if not isinstance(where, str) or "://" in where or not Path(where).is_dir():
        return None  # the dump moved or is remote: --arch or --dump says which model
    return where


def _model_type(table: Any, dump: Path | None, read: Any) -> str | None:
    """The recorded model's class from ``--dump`` or the dump the ranks file names."""
    if dump is not None:
        return read(dump)  # type: ignore[no-any-return]
    where = _recorded_dump(table, None)
    if where is None:
        return None
    try:
        return read(where)  # type: ignore[no-any-return]
    except Exception:  # a dump we cannot read only means no inference
        return None


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""

    @app.command("prune", cls=TdumpCommand)
    def prune_cmd(
        ckpt: Path = typer.Argument(
            ...,
            metavar="CKPT",
            help="Checkpoint: tdump checkpoint, state_dict, or a dict holding one.",
        ),
        ranks: Path = typer.Argument(..., metavar="RANKS", help="ranks.parquet from `tdump rank`."),
        output: Path = typer.Option(
            Path("pruned.pt"),
            "-o",
            "--output",
            "--out",
            metavar="PATH",
            help="Where to write the pruned checkpoint.",
        ),
        count: int | None = typer.Option(
            None,
            "--count",
            metavar="N",
            help="Channels to remove (a coupled group's channel counts once).",
        ),
        ratio: float | None = typer.Option(
            None, "--ratio", metavar="R", help="Fraction of channels to remove."
        ),
        scope: str = typer.Option(
            "global",
            "--scope",
            metavar="SCOPE",
            help="global (rank all layers together) or per-layer.",
        ),
        min_channels: int = typer.Option(
            1, "--min-channels", metavar="K", help="Every layer keeps at least this many channels."
        ),
        max_ratio: float | None = typer.Option(
            None,
            "--max-ratio",
            metavar="M",
            help="At most this fraction of any one layer goes (global default 0.8).",
        ),
        round_to: int | None = typer.Option(
            None, "--round-to", metavar="N", help="Keep channel counts multiples of this."
        ),
        arch: str | None = typer.Option(
            None,
            "--arch",
            metavar="ARCH",
            help="Architecture: torchvision.models.resnet18, mymodels:Net or train.py:Net "
            "(overrides the checkpoint's; imported only when you name it).",
        ),
        arch_kwargs: str | None = typer.Option(
            None, "--arch-kwargs", metavar="JSON", help="JSON keyword arguments for --arch."
        ),
        like: Path | None = typer.Option(
            None,
            "--like",
            metavar="PREV.pt",
            help="The previous round's tdump checkpoint: architecture and kept channels "
            "for a fine-tuned state_dict CKPT.",
        ),
        prefix: str | None = typer.Option(
            None,
            "--prefix",
            metavar="PREFIX",
            help="Wrapper prefix to strip from ranked layer and checkpoint key names "
            "(e.g. model.); detected when absent.",
        ),
        dump: Path | None = typer.Option(
            None,
            "--dump",
            metavar="DUMP",
            help="The dump the ranks came from (default: the ranks file's); its model type "
            "picks the architecture of a plain state_dict.",
        ),
        ignore: str | None = typer.Option(
            None, "--ignore", metavar="REGEX", help="Regex of module paths to leave alone."
        ),
        criterion: str | None = typer.Option(
            None, "--criterion", metavar="NAME", help="Criterion to use when ranks hold several."
        ),
        conv_only_groups: bool = typer.Option(
            False, "--conv-only-groups", help="Leave residual groups alone."
        ),
        aggregate: str = typer.Option(
            "mean", "--aggregate", metavar="NAME", help="How coupled convs' scores combine."
        ),
        normalize: str = typer.Option(
            "mean",
            "--normalize",
            help="Per-layer score scale before global ranking: mean, rms, l2 or none.",
        ),
        input_shape: str | None = typer.Option(
            None,
            "--input-shape",
            metavar="C,H,W",
            help="Input shape for FLOPs, e.g. 3,224,224 [from the dump, else 3,224,224].",
        ),
        save_plan: Path | None = typer.Option(
            None, "--save-plan", metavar="PATH", help="Also write the plan as JSON here."
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print what would change; write nothing."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Write a checkpoint without the lowest-ranked conv filters and all coupled channels."""
        import copy
        import re
        import warnings

        import tdump.surgery as surgery
        from tdump.surgery._io import dump_model_type, strip_ranks_prefix

        kwargs = json_object_option(arch_kwargs, "--arch-kwargs")
        if ignore:
            try:
                re.compile(ignore)
            except re.error as exc:
                raise ConfigError(f"--ignore is not a valid regex ({exc}): {ignore}") from None
        _check_order(ckpt, ranks)
        table = surgery.read_ranks_table(ranks)
        model_type = None
        if arch is None:
            model_type = _model_type(table, dump, dump_model_type)
        model = surgery.load(
            ckpt, arch, kwargs, ignore=ignore, like=like, prefix=prefix, model_type=model_type
        )
        inferred = list(surgery.provenance(model).notes)
        table, stripped = strip_ranks_prefix(table, model, prefix)
        if stripped and not prefix:
            inferred.append(f"stripped the prefix {stripped!r} from ranked layer names")
        model.eval()
        before = copy.deepcopy(model)
        with warnings.catch_warnings():  # the plan's notes say it, printed below
            warnings.simplefilter("ignore", surgery.FewChannelsWarning)
            pruned, plan = surgery.prune(
                model,
                table,
                count=count,
                ratio=ratio,
                scope=scope,
                min_channels=min_channels,
                max_ratio=max_ratio,
                round_to=round_to,
                ignore=ignore,
                conv_only_groups=conv_only_groups,
                criterion=criterion,
                aggregate=aggregate,
                normalize=normalize,
                inplace=True,
            )
        # what was inferred is said first, in the table and in --json; the plan's notes say
        # why fewer channels went than asked (the caps, grouped convs, --round-to)
        plan.notes[:0] = inferred
        shape = _parse_shape(input_shape, before, _recorded_dump(table, dump))
        summary = summarize(before, pruned, plan, shape)
        written = None
        if not dry_run:
            surgery.save(output, pruned)
            written = str(output)
            if save_plan is not None:
                plan.save(save_plan)
        summary["output"] = written
        summary["dry_run"] = dry_run
        if as_json:
            print(json.dumps(summary))
        else:
            _print(summary, dry_run, written, ckpt.name)
