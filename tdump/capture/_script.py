"""The training script ``tdump record`` runs: checked before it runs, its crash shown as Python would.

Torch-free, so that the CLI can check its input before torch loads.

Examples
--------
>>> check_script("no/such/train.py")
Traceback (most recent call last):
...
tdump.errors.ConfigError: no training script at no/such/train.py; check the path
"""

from __future__ import annotations

import codecs
import importlib.util
import io
import os
import sys
import tokenize
import traceback
import zipfile
from importlib.util import MAGIC_NUMBER

from tdump.errors import ConfigError, first_line

__all__ = ["check_module", "check_script", "import_folder", "print_script_traceback"]

#: Bytes of a script read to tell source text from a binary file (a checkpoint, an image).
_HEAD = 1 << 20


def check_script(script: str) -> None:
    """Refuse (one line) a ``script`` that ``runpy`` could not run as Python.

    Accepted: Python source text, a compiled ``.pyc`` and a zip archive holding
    ``__main__.py`` (what ``python script`` runs). A syntax error is left to the
    run: the user's own traceback points at the line.

    Raises
    ------
    ConfigError
        No file at ``script``, or a file that is not a Python script (a torch
        checkpoint given in place of the training script, say).
    """
    if not os.path.isfile(script):
        raise ConfigError(f"no training script at {script}; check the path")
    fix = (
        "pass the training script first, its arguments after it "
        "(tdump record train.py -- --init ckpt.pt)"
    )
    if zipfile.is_zipfile(script):
        with zipfile.ZipFile(script) as zf:
            if "__main__.py" in zf.namelist():
                return  # a zipapp: python runs its __main__.py
        raise ConfigError(
            f"{script} is not a Python script but a zip archive (a torch checkpoint?); {fix}"
        )
    with open(script, "rb") as f:
        head = f.read(_HEAD)
        whole = not f.read(1)
    if head.startswith(MAGIC_NUMBER):
        return  # compiled bytecode of this Python
    if b"\0" in head:
        raise ConfigError(f"{script} is not a Python script but a binary file; {fix}")
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(head).readline)
        codecs.getincrementaldecoder(encoding)().decode(head, final=whole)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise ConfigError(
            f"{script} is not a Python script: it is not text ({first_line(exc, None)}); {fix}"
        ) from None


def import_folder(script: str, *, module: bool = False) -> str:
    """The folder Python puts first on ``sys.path`` for ``script``: the script's own, or
    for a module run as ``python -m`` (``module=True``) the current one.

    >>> import_folder("/work/exp/train.py")
    '/work/exp'
    """
    return os.getcwd() if module else os.path.dirname(os.path.abspath(script))


def check_module(module: str) -> str:
    """The file ``python -m module`` would run (from the current folder), or a one-line
    :class:`ConfigError` saying why there is none.

    Like ``python -m``, this imports the module's parent packages.
    """
    if not module.strip():
        raise ConfigError("-m needs a module name after it, e.g. -m mypkg.train")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)  # where python -m looks first
    try:
        spec = importlib.util.find_spec(module)
        package = spec is not None and spec.submodule_search_locations is not None
        if package:  # python -m runs a package's __main__
            spec = importlib.util.find_spec(module + ".__main__")
    except (ImportError, ValueError) as exc:  # a parent package that fails, "", ".x"
        raise ConfigError(
            f"cannot find module {module!r}: {first_line(exc, None)}; check that "
            f"python -m {module} runs from {cwd}"
        ) from None
    finally:
        sys.path.remove(cwd)
    if package and spec is None:
        raise ConfigError(
            f"{module} is a package without a __main__ module, so python -m cannot run it; "
            f"name the module that trains (-m {module}.train)"
        )
    if spec is None or not spec.origin or not spec.has_location:
        raise ConfigError(
            f"no module named {module!r} from {cwd}; check the name, and run tdump "
            f"from the folder where python -m {module} works"
        )
    return spec.origin


def print_script_traceback(exc: BaseException, script: str) -> None:
    """Print ``exc`` as ``python script`` would: frames from the script on, not tdump's.

    A syntax error in the script itself is raised while it is compiled, before any
    frame of it runs: Python prints it without a traceback, and so does this.
    """
    path = os.path.abspath(script)
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != path:
        tb = tb.tb_next
    if tb is None and not isinstance(exc, SyntaxError):
        tb = exc.__traceback__  # not raised by the script: every frame, to find the cause
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
