"""`tdump record`: run an unmodified training script and capture tensors from it."""

from __future__ import annotations

import difflib
from typing import Any

import typer

from tdump.cli._help import AFTER_DASHES, TdumpCommand

__all__ = ["register"]

SEED_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"  # = capture.DEFAULT_INCLUDE


class _RecordCommand(TdumpCommand):
    """Help shows ``(SCRIPT | -m MODULE) [-- ARGS...]``: the script's arguments follow ``--``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ["[OPTIONS]", "(SCRIPT | -m MODULE)", "[-- ARGS...]"]

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Refuse a SCRIPT that looks like an option: it is a mistyped tdump option.

        ``ignore_unknown_options`` lets the script's own options through, but it also
        turns ``--intervall 5 train.py`` into SCRIPT ``--intervall``; say what click says
        for any other command (``No such option: ... (Possible options: ...)``) instead of
        "no training script". A SCRIPT after an explicit ``--`` is taken as written.
        """
        given = list(args)
        rest: list[str] = super().parse_args(ctx, args)
        script = ctx.params.get("script")
        opts = [o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts)]
        if ctx.params.get("module") is not None:
            _module_args(ctx, given, {o for o in opts if o != "--help"})
            return rest
        looks_like_option = isinstance(script, str) and script.startswith("-") and script != "-"
        if looks_like_option and not ("--" in given and given.index("--") < given.index(script)):
            name = script.split("=", 1)[0]
            close = difflib.get_close_matches(name, [o for o in opts if o.startswith("--")])
            hint = f" (Possible options: {', '.join(sorted(close))})" if close else ""
            # ctx.fail: the UsageError of whichever click typer runs on (typer 0.28 vendors
            # its own), so the usage block and exit status 2 match prune's
            ctx.fail(f"No such option: {name}{hint}")
        if isinstance(script, str):
            own = _own_option_after_script(
                list(ctx.params.get("args") or []),
                ctx.meta.get(AFTER_DASHES),
                # --help is left to the script, and so is -m (train.py -m resnet18: a
                # script's option as often as not; -m MODULE replaces SCRIPT)
                {o for o in opts if o not in ("--help", "-m", "--module")},
            )
            if own is not None:
                ctx.fail(
                    f"{own} after SCRIPT goes to {script}, not to tdump record; put it before "
                    f"SCRIPT (tdump record {own} ... {script}), or after -- if {script} takes "
                    f"{own} itself (tdump record {script} -- {own} ...)"
                )
        return rest


def _module_args(ctx: Any, given: list[str], opts: set[str]) -> None:
    """With ``-m MODULE``, every word after it is the module's, as after ``python -m``:
    what click took as SCRIPT is the module's first argument. One of record's own
    options after MODULE (click has taken it as tdump's) is refused, as after SCRIPT."""
    script = ctx.params.get("script")
    ctx.params["args"] = [*([script] if script is not None else []), *(ctx.params["args"] or [])]
    ctx.params["script"] = None
    # -m MODULE, --module MODULE, -mMODULE or --module=MODULE: the words after it
    at = next(i for i, w in enumerate(given) if w.startswith(("-m", "--module")))
    after = given[at + (2 if given[at] in ("-m", "--module") else 1) :]
    if "--" in after:
        after = after[: after.index("--")]
    own = _own_option_after_script(after, None, opts - {"-m", "--module"})
    if own is not None:
        module = ctx.params["module"]
        ctx.fail(
            f"{own} after -m MODULE goes to {module}, not to tdump record; put it before -m "
            f"(tdump record {own} ... -m {module}), or after -- if {module} takes {own} "
            f"itself (tdump record -m {module} -- {own} ...)"
        )


def _own_option_after_script(
    script_args: list[str], after_dashes: list[str] | None, opts: set[str]
) -> str | None:
    """The first of record's own options (``opts``) written after SCRIPT and before ``--``.

    Such a word goes to the script (``allow_interspersed_args=False``), so
    ``tdump record train.py --interval 1`` would silently save every 100th step; and
    ``tdump loop train.py --interval 1`` reads it as tdump's. Neither reading is safe to
    guess, so the word is refused. ``after_dashes``: the words after the command line's
    ``--`` (:data:`~tdump.cli._help.AFTER_DASHES`), which end ``script_args`` when that
    ``--`` follows SCRIPT.

    >>> _own_option_after_script(["--epochs", "2", "-n1"], None, {"-n", "--interval"})
    '-n'
    >>> _own_option_after_script(["--interval", "1"], ["--interval", "1"], {"--interval"})
    """
    if after_dashes is not None and len(after_dashes) <= len(script_args):
        script_args = script_args[: len(script_args) - len(after_dashes)]
    for word in script_args:
        if word == "--":  # a second ``--``, after one before SCRIPT: the rest is the script's
            break
        name = word.split("=", 1)[0]
        if name in opts:
            return name
        if not word.startswith("--") and word[:2] in opts:  # -n1: a short option and its value
            return word[:2]
    return None


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""

    @app.command(
        "record",
        cls=_RecordCommand,
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )
    def record(
        script: str = typer.Argument(
            None, metavar="SCRIPT", help="The training script (run as __main__, unmodified)."
        ),
        args: list[str] = typer.Argument(
            None, metavar="ARGS", help="Arguments for the script (after `--`)."
        ),
        out: str = typer.Option(
            "tdump.zarr", "--out", "-o", metavar="PATH", help="Store path or fsspec URL."
        ),
        include: str = typer.Option(
            None,
            "--include",
            "-i",
            metavar="REGEX",
            help=f"Regex of tensor names to save [default: {SEED_INCLUDE}, the outputs "
            "of activation modules (ReLU, GELU, ...) whatever their names, and the "
            "pre-activations of layers none of them carries].",
        ),
        interval: int = typer.Option(
            None, "--interval", "-n", metavar="N", help="Save every N steps [default: 100]."
        ),
        append: bool = typer.Option(
            False, "--append", help="Continue an existing dump of the same model."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dump."),
        config: str = typer.Option(
            None,
            "--config",
            metavar="FILE|JSON",
            help="Hook settings: a JSON/YAML file or inline JSON.",
        ),
        strict: bool = typer.Option(
            False, "--strict", help="Let errors in the hook stop training."
        ),
        module: str = typer.Option(
            None,
            "-m",
            "--module",
            metavar="MODULE",
            help="Run library module MODULE as python -m does (from this folder), instead "
            "of SCRIPT; the words after it are its arguments.",
        ),
    ) -> None:
        """Run SCRIPT under capture: finds the model, loss and optimizer steps by itself.

        tdump's options go before SCRIPT, the script's own after it (or after --).
        An --out that already holds a dump is refused unless --append or --overwrite.

        Example: tdump record --out run.zarr --interval 50 train.py -- --epochs 1
        (a module in a package: tdump record -m mypkg.train --epochs 1)
        """
        import sys

        from tdump.capture._config import HookConfig, load_config, with_default_selection
        from tdump.capture._out import prepare_out
        from tdump.capture._script import check_module, check_script
        from tdump.errors import ConfigError

        if append and overwrite:
            raise ConfigError("--append and --overwrite exclude each other; pass one of them")
        if (script is None) == (module is None):
            raise ConfigError(
                "give the training script (tdump record train.py) or -m MODULE (tdump "
                "record -m mypkg.train), one of them"
            )
        # A missing script, or a checkpoint given in its place: refused before torch loads
        # and before prepare_out, which deletes the dump at --out under --overwrite.
        if module is not None:
            check_module(module)
        else:
            check_script(script)
        data: dict[str, Any] = load_config(config) if config else {}
        if include is not None:
            data["include_regex"] = include
        with_default_selection(data)
        if interval is not None:
            data["save_interval"] = interval
        if out != "tdump.zarr" or "out" not in data:
            data["out"] = out
        if strict:
            data["strict"] = True
        if append or overwrite:
            data["write_mode"] = "append" if append else "overwrite"
        cfg = HookConfig.from_dict(data)
        prepare_out(cfg)  # a bad --out: one line before torch loads and the script starts

        from tdump.capture._record import run_script

        target = module if module is not None else script
        code = run_script(target, list(args or []), cfg, module=module is not None)
        if code:
            sys.exit(code)
