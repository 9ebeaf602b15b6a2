"""Help that reads cleanly: arguments by their metavar, without typer's type labels.

Recent typer shows a required argument as ``{dump}`` in the usage line and types as
``<str>`` / ``<int>`` labels; every tdump command uses :class:`TdumpCommand` instead, so
``tdump rank --help`` (plain help: the app sets ``rich_markup_mode=None``) says
``Usage: tdump rank [OPTIONS] DUMP`` and ``DUMP  Dump path ...``. Options show their
own ``metavar=`` (``--out PATH``).

Examples
--------
>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer(rich_markup_mode=None)  # as tdump's app
>>> @app.command(cls=TdumpCommand)
... def go(dump: str = typer.Argument(..., metavar="DUMP", help="The dump.")) -> None:
...     pass
>>> @app.command()
... def other() -> None:
...     pass
>>> text = CliRunner().invoke(app, ["go", "--help"]).output
>>> "Usage: root go [OPTIONS] DUMP" in text, "<str>" in text, "{" in text
(True, False, False)
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperOption

__all__ = ["AFTER_DASHES", "TdumpCommand"]

#: ``ctx.meta`` key: the words after ``--`` on the command line (``None`` without ``--``).
AFTER_DASHES = "tdump.after_dashes"


class TdumpCommand(TyperCommand):
    """A typer command whose arguments show as ``DUMP`` / ``[PATH]``, without ``<str>``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.metavar = param.metavar or (param.name or "").upper()
                # typer 0.29 adds a type label (``dump <str>``); older typer has no such method
                setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010
            elif isinstance(param, TyperOption) and not param.is_flag and not param.metavar:
                # an option without its own metavar= shows its name (--rounds ROUNDS), not <int>
                param.metavar = (param.name or "value").upper()

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # click hands the first word after ``--`` to an optional positional argument
        # left empty before it (``tdump loop --resume ... -- --out {out}`` makes
        # ``--out`` the script); keep what followed ``--`` so a command can tell
        ctx.meta[AFTER_DASHES] = args[args.index("--") + 1 :] if "--" in args else None
        allowed = ctx.allow_extra_args
        ctx.allow_extra_args = True  # click's refusal of extra words says nothing of a fix
        try:
            rest = list(super().parse_args(ctx, args))
        finally:
            ctx.allow_extra_args = allowed
        if rest and not allowed and not ctx.resilient_parsing:
            hint = self.extra_hint(rest)
            ctx.fail(
                f"Got unexpected extra argument{'s' if len(rest) > 1 else ''} "
                f"({' '.join(rest)})" + (f": {hint}" if hint else "")
            )
        return rest

    def extra_hint(self, words: list[str]) -> str | None:
        """How to say ``words`` (positional words the command does not take), or None."""
        return None

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not isinstance(param, TyperArgument) or param.hidden:
                continue
            name = param.metavar or (param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces
