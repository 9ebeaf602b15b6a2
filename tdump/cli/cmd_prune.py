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

from tdump.cli._help import TdumpCommand
from tdump.cli._options import json_object_option, shape_option
from tdump.cli._prune_inputs import flops_input_shape, known_input_shape, more_inputs
from tdump.cli._prune_report import print_summary, summarize
from tdump.errors import ConfigError, DumpNotFoundError

__all__ = ["register"]


def _missing_inputs(ckpt: Path, ranks: Path) -> list[str]:
    """What is wrong with CKPT and RANKS that a look at the file system shows (the
    messages ``tdump.load`` and ``read_ranks`` give for a missing file).

    >>> _missing_inputs(Path("nothere.pt"), Path("nothere.parquet"))  # doctest: +NORMALIZE_WHITESPACE
    ['no checkpoint at nothere.pt; check the path',
     'no ranks file at nothere.parquet; create one with `tdump rank DUMP -o nothere.parquet`']
    """
    from tdump.analyze._ranks_io import no_ranks_file
    from tdump.surgery._checkpoint import no_checkpoint

    found = []
    if not ckpt.exists():
        found.append(no_checkpoint(ckpt))
    if not ranks.exists():
        found.append(no_ranks_file(ranks))
    return found


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


def _named_dump(table: Any, ranks: Path) -> tuple[str | None, str]:
    """The dump the ranks file names if it is a local folder still there, else why not."""
    where = (table.attrs.get("tdump") or {}).get("dump")
    if not isinstance(where, str) or not where:
        return None, "the ranks file names no dump"
    if "://" in where:  # not opened for an inference: --arch or --dump says which model
        return None, f"the ranks' dump {where} is remote"
    candidates = [Path(where)]
    if not Path(where).is_absolute():
        # recorded as typed, relative to where `tdump rank` ran: mostly the ranks' folder
        candidates.append(ranks.parent / where)
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate), ""
    return None, f"the dump the ranks name ({where}) is not there (moved or deleted?)"


def _check_dump_option(dump: Path, named: str | None) -> None:
    """An explicit ``--dump`` must be a dump: a typo must not silently change the FLOPs."""
    from tdump._format import StoreReader
    from tdump.surgery._stats import clause_line

    if not dump.exists():
        instead = f", or leave --dump out to use the one the ranks name ({named})" if named else ""
        raise ConfigError(
            f"--dump {dump} does not exist; give the dump the ranks came from{instead}"
        )
    try:
        StoreReader(str(dump)).ranks()
    except Exception as exc:  # NotADumpError, a damaged store, a permission error
        raise ConfigError(f"--dump {dump} is not a readable dump: {clause_line(exc)}") from None


def _next_name(ckpt: Path) -> Path:
    """A name for the pruned checkpoint beside ``ckpt``: ``pruned.pt`` -> ``pruned2.pt``.

    >>> _next_name(Path("ckpt.pt")), _next_name(Path("pruned2.pt"))
    (PosixPath('ckpt.pruned.pt'), PosixPath('pruned3.pt'))
    """
    import re

    head, number = re.fullmatch(r"(.*?)(\d*)", ckpt.stem).groups()  # type: ignore[union-attr]
    if "pruned" not in head:
        return ckpt.with_name(f"{ckpt.stem}.pruned.pt")
    return ckpt.with_name(f"{head}{int(number or 1) + 1}.pt")


def _check_outputs(
    targets: list[tuple[str, Path, str]],
    inputs: list[tuple[str, Path | None]],
    dumps: list[str],
    ckpt: Path,
) -> None:
    """Refuse ``-o`` / ``--save-plan`` paths that would replace an input or land in a dump.

    ``targets``: (flag, path, what to add after the path); ``inputs``: (what it is,
    path). Checked before anything is loaded: the run that would destroy CKPT fails
    at once, and nothing is written.
    """
    from tdump.analyze._paths import beside_dump, is_inside, same_path

    for flag, path, extra in targets:
        alt = (
            _next_name(ckpt)
            if flag == "-o"
            else targets[0][1].with_name(f"{targets[0][1].stem}.plan.json")
        )
        for label, source in inputs:
            if source is not None and same_path(path, source):
                raise ConfigError(
                    f"{flag} {path}{extra} is {label}: writing there would replace it; "
                    f"choose another {flag}, e.g. {flag} {alt}"
                )
        for dump in dumps:
            if same_path(path, dump) or is_inside(path, dump):
                where = "is the dump" if same_path(path, dump) else "is inside the dump"
                suffix = "pruned.pt" if flag == "-o" else "plan.json"
                raise ConfigError(
                    f"{flag} {path}{extra} {where} {dump} (recording it again deletes what is "
                    f"inside): choose another {flag}, e.g. {flag} {beside_dump(dump, suffix)}"
                )
    if len(targets) == 2 and same_path(targets[0][1], targets[1][1]):
        raise ConfigError(
            f"--save-plan {targets[1][1]} is the -o path too: choose another --save-plan, "
            f"e.g. --save-plan {targets[0][1].with_name(f'{targets[0][1].stem}.plan.json')}"
        )


def _ignore_note(model: Any, ignore: str) -> str | None:
    """A note when ``--ignore`` matches no module path: a typo would prune what it meant to keep."""
    import difflib
    import re

    from torch import nn

    names = [n for n, _ in model.named_modules() if n]
    pattern = re.compile(ignore)
    if any(pattern.search(n) for n in names):
        return None
    close = difflib.get_close_matches(ignore, names, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    else:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
        hint = f"module paths look like {', '.join((convs or names)[:3])}"
    return f"--ignore {ignore!r} matches no module of the model, so it leaves nothing alone; {hint}"


class _PruneCommand(TdumpCommand):
    def extra_hint(self, words: list[str]) -> str | None:
        """``tdump prune ckpt.pt ranks.parquet 0.3``: how much and where are options.

        >>> hint = _PruneCommand(name="prune").extra_hint
        >>> hint(["0.3"]), hint(["40"]), hint(["small.pt"])
        ('the fraction to remove is an option: --ratio 0.3', 'the number of channels to remove is an option: --count 40', 'the output is an option: --out small.pt')
        """
        if len(words) != 1:
            return None
        word = words[0]
        if word.isdigit():
            return f"the number of channels to remove is an option: --count {word}"
        try:
            fraction = 0 < float(word) < 1
        except ValueError:
            fraction = False
        if fraction:
            return f"the fraction to remove is an option: --ratio {word}"
        if word.endswith((".pt", ".pth")):
            return f"the output is an option: --out {word}"
        return None


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""

    @app.command("prune", cls=_PruneCommand)
    def prune_cmd(
        ckpt: Path = typer.Argument(
            ...,
            metavar="CKPT",
            help="Checkpoint: tdump checkpoint, state_dict, or a dict holding one.",
        ),
        ranks: Path = typer.Argument(..., metavar="RANKS", help="ranks.parquet from `tdump rank`."),
        output: Path | None = typer.Option(
            None,
            "-o",
            "--output",
            "--out",
            metavar="PATH",
            help="Where to write the pruned checkpoint [default: pruned.pt]; never CKPT, "
            "RANKS, --like or inside the dump.",
        ),
        count: int | None = typer.Option(
            None,
            "--count",
            metavar="N",
            help="Channels to remove (a coupled group's channel counts once); this or --ratio.",
        ),
        ratio: float | None = typer.Option(
            None,
            "--ratio",
            metavar="R",
            help="Fraction of channels to remove, e.g. 0.2; this or --count.",
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
            help=(
                "Input shape for FLOPs, and for tracing a forward that branches on shapes, "
                "e.g. 3,224,224 [from the dump, else 3,224,224 for FLOPs]."
            ),
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
        import re
        import warnings

        import tdump.surgery as surgery
        from tdump.surgery._io import dump_model_type
        from tdump.surgery._prefix import strip_ranks_prefix
        from tdump.surgery._weight_norm import copy_model

        # values checked without reading a file come first: a bad --ratio is said before
        # anything about the checkpoint or the architecture (Settings checks as it is made),
        # and this one Settings is what surgery.prune selects with; a missing input file
        # is said in the same line, so one retry fixes both
        missing = _missing_inputs(ckpt, ranks)
        try:
            settings = surgery.Settings(
                count=count,
                ratio=ratio,
                scope=scope,
                min_channels=min_channels,
                max_ratio=max_ratio,
                round_to=round_to,
                conv_only_groups=conv_only_groups,
                aggregate=aggregate,
                normalize=normalize,
            )
        except ConfigError as exc:
            if missing:
                raise ConfigError("; ".join([*missing, str(exc)])) from None
            raise
        if missing:
            raise DumpNotFoundError("; ".join(missing))
        kwargs = json_object_option(arch_kwargs, "--arch-kwargs")
        if ignore:
            try:
                re.compile(ignore)
            except re.error as exc:
                raise ConfigError(f"--ignore is not a valid regex ({exc}): {ignore}") from None
        shape = shape_option(input_shape, example="3,224,224") if input_shape else None
        _check_order(ckpt, ranks)
        table = surgery.read_ranks_table(ranks)
        named, why_none = _named_dump(table, ranks)
        if dump is not None:
            _check_dump_option(dump, named)
        out = output if output is not None else Path("pruned.pt")
        targets = (
            [] if dry_run and output is None else [("-o", out, "" if output else " (the default)")]
        )
        if save_plan is not None and not dry_run:
            targets.append(("--save-plan", save_plan, ""))
        _check_outputs(
            targets,
            [
                ("the checkpoint being pruned (CKPT)", ckpt),
                ("the ranks file being read (RANKS)", ranks),
                ("the previous round's checkpoint (--like)", like),
            ],
            [str(d) for d in (dump, named) if d is not None],
            ckpt,
        )
        source = str(dump) if dump is not None else named
        model_type = None
        if arch is None and source is not None:
            try:
                model_type = dump_model_type(source)
            except Exception:  # the named dump is damaged: --arch says which model
                if dump is not None:
                    raise
        known = known_input_shape(shape, source, why_none)
        model = surgery.load(
            ckpt,
            arch,
            kwargs,
            ignore=ignore,
            like=like,
            prefix=prefix,
            model_type=model_type,
            input_shape=known[0],
        )
        inferred = list(surgery.provenance(model).notes)
        table, stripped = strip_ranks_prefix(table, model, prefix)
        if stripped and not prefix:
            inferred.append(f"stripped the prefix {stripped!r} from ranked layer names")
        unmatched = _ignore_note(model, ignore) if ignore else None
        if unmatched:
            inferred.append(unmatched)
        model.eval()
        before = copy_model(model)
        with warnings.catch_warnings():  # the plan's notes say it, printed below
            warnings.simplefilter("ignore", surgery.FewChannelsWarning)
            pruned, plan = surgery.prune(
                model,
                table,
                settings=settings,
                ignore=ignore,
                criterion=criterion,
                inplace=True,
                input_shape=known[0],
            )
        # what was inferred is said first, in the table and in --json; the plan's notes say
        # why fewer channels went than asked (the caps, grouped convs, --round-to)
        plan.notes[:0] = inferred
        shape, shape_from, fallback = flops_input_shape(known, before)
        if fallback:
            plan.notes.append(fallback)
        summary = summarize(before, pruned, plan, shape, shape_from, more_inputs(source))
        written = None
        if not dry_run:
            surgery.save(out, pruned)
            written = str(out)
            if save_plan is not None:
                plan.save(save_plan)
        summary["output"] = written
        summary["dry_run"] = dry_run
        if as_json:
            print(json.dumps(summary))
        else:
            print_summary(summary, dry_run, written, ckpt.name)
