"""`tdump record`: run an unmodified training script and capture tensors from it."""

from __future__ import annotations

from typing import Any

import typer

__all__ = ["register"]

SEED_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"  # = capture.DEFAULT_INCLUDE


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""

    @app.command(
        "record",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )
    def record(
        script: str = typer.Argument(
            ..., help="The training script (run as __main__, unmodified)."
        ),
        args: list[str] = typer.Argument(None, help="Arguments for the script (after `--`)."),
        out: str = typer.Option("tdump.zarr", "--out", "-o", help="Store path or fsspec URL."),
        include: str = typer.Option(
            None,
            "--include",
            "-i",
            help=f"Regex of tensor names to save [default: {SEED_INCLUDE}].",
        ),
        interval: int = typer.Option(None, "--interval", "-n", help="Save every N steps [100]."),
        config: str = typer.Option(
            None, "--config", "-c", help="Hook settings: a JSON/YAML file or inline JSON."
        ),
        strict: bool = typer.Option(
            False, "--strict", help="Let errors in the hook stop training."
        ),
    ) -> None:
        """Run SCRIPT under capture: finds the model, loss and optimizer steps by itself.

        Example: tdump record --out run.zarr --interval 50 train.py -- --epochs 1
        """
        import sys

        from tdump.capture._config import HookConfig, load_config
        from tdump.capture._record import run_script

        data: dict[str, Any] = load_config(config) if config else {}
        data.setdefault("include_regex", SEED_INCLUDE)
        if include is not None:
            data["include_regex"] = include
        if interval is not None:
            data["save_interval"] = interval
        if out != "tdump.zarr" or "out" not in data:
            data["out"] = out
        if strict:
            data["strict"] = True
        cfg = HookConfig.from_dict(data)
        code = run_script(script, list(args or []), cfg)
        if code:
            sys.exit(code)
