"""The loop's in-process step as a command: ``python -m tdump.loop checkpoint``.

The loop's ``measure`` step saves each round's model as a tdump checkpoint
(``round_NNN/checkpoint.pt``, what the next round prunes) in the loop's own process.
So that ``commands.sh`` can be rerun by hand, that step is logged there as this
command, which does the same through the same code (:func:`save_round_checkpoint`).

Examples
--------
>>> from pathlib import Path
>>> paths = {"model": Path("exp/round_000/model.pt"), "checkpoint": Path("exp/round_000/checkpoint.pt"),
...          "dump": Path("exp/round_000/dump.zarr")}
>>> checkpoint_command(paths, None, "train.py:Net", None)
'python -m tdump.loop checkpoint exp/round_000/model.pt -o exp/round_000/checkpoint.pt --dump exp/round_000/dump.zarr --arch train.py:Net'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tdump.loop._stages import rel_path

__all__ = ["checkpoint_command", "main", "save_round_checkpoint", "script_importable"]


@contextmanager
def script_importable(folder: str) -> Iterator[None]:
    """The script's ``folder`` on ``sys.path`` (architectures named like ``mynets.Net``)."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def save_round_checkpoint(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    init: str | os.PathLike[str] | None,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    dump: str | os.PathLike[str] | None,
) -> Any:
    """Load the state_dict a round's script saved and write it as a tdump checkpoint.

    ``init`` is the round's starting checkpoint (its pruned shape), ``arch`` the
    loop's ``--arch`` (trusted: the user named it), ``dump`` the round's dump (whose
    recorded model type picks a registered builder for round 0 without ``arch``).
    Returns the model.
    """
    import tdump.surgery as surgery
    from tdump.loop._metrics import load_round_model

    model = load_round_model(model_path, init, arch, arch_kwargs, dump)
    surgery.save(out, model)
    return model


def checkpoint_command(
    paths: Mapping[str, Path],
    init: str | None,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
) -> str:
    """The shell line of :func:`save_round_checkpoint` for a round's ``paths``."""
    argv = ["python", "-m", "tdump.loop", "checkpoint", rel_path(paths["model"])]
    argv += ["-o", rel_path(paths["checkpoint"]), "--dump", rel_path(paths["dump"])]
    if init:
        argv += ["--init", rel_path(Path(init))]
    if arch:
        argv += ["--arch", arch]
        if arch_kwargs:
            argv += ["--arch-kwargs", json.dumps(arch_kwargs)]
    return shlex.join(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tdump.loop checkpoint MODEL -o OUT [--init INIT] [--arch A] [--dump D]``.

    Errors are one ``error: ...`` line on stderr and exit status 1, as with ``tdump``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tdump.loop",
        description="The tdump loop's in-process step, rerunnable from commands.sh.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser(
        "checkpoint", help="Save a round's state_dict as a tdump checkpoint (the measure step)."
    )
    cmd.add_argument("model", help="What the round's script saved (round_NNN/model.pt).")
    cmd.add_argument("-o", "--out", required=True, help="The checkpoint to write.")
    cmd.add_argument("--init", help="The round's starting checkpoint (round_NNN/init.pt).")
    cmd.add_argument("--arch", help="Architecture, as tdump loop --arch.")
    cmd.add_argument("--arch-kwargs", help="JSON keyword arguments for --arch.")
    cmd.add_argument("--dump", help="The round's dump (its model type, for round 0).")
    args = parser.parse_args(argv)
    from tdump.cli._options import json_object_option
    from tdump.errors import TdumpError

    # --arch mynets.Net: the script's folder is on PYTHONPATH, which commands.sh exports
    try:
        kwargs = json_object_option(args.arch_kwargs, "--arch-kwargs")
        save_round_checkpoint(args.model, args.out, args.init, args.arch, kwargs, args.dump)
    except TdumpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0
