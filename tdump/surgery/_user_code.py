r"""Importing code the user named (``--arch mymodels:Net``, ``train.py:Net``), safely.

A module of the user's project, or a script given by path, is never imported whole:
tdump runs only the statements that the named class or function needs
(:mod:`tdump.surgery._slice`: imports, set-up calls, the definitions and assignments it
reads), under a private module name, so a training loop at the script's top level and
its ``__main__`` block never run. What was left out is kept on the module
(:func:`skipped_note` says it). A module the process already imported, and installed
packages, are used as they are. Only names the *user* passes reach this module
(:mod:`tdump.surgery._arch` decides that).

Examples
--------
>>> import types
>>> module = types.ModuleType("m")
>>> skipped_note(module, "Net") is None
True
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import sys
import traceback
import types
from typing import Any

from tdump.errors import ConfigError, first_line
from tdump.surgery._slice import binds, describe, slice_for

__all__ = ["import_attr", "module_of", "skipped_note", "unmet_hint"]

#: Attribute of a sliced module: the :class:`~tdump.surgery._slice.Slice` it ran and the file.
_SLICE_ATTR = "__tdump_slice__"


def import_attr(module_name: str, attr: str, arch: str) -> Any:
    """``attr`` (dotted) of module or script ``module_name``; ``arch`` is the name as given.

    A script or a module of the user's project (under the current directory) runs only
    what ``attr`` needs; any import failure is one :class:`~tdump.errors.ConfigError` line.
    """
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # so `mymodels.Net` works from a project root
    target = attr.split(".")[0]
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            full = os.path.abspath(module_name)
            if not os.path.isfile(full):
                raise ImportError(f"no file {module_name}")
            module = _import_slice(full, module_name, target, None, arch)
        elif module_name in sys.modules:
            module = sys.modules[module_name]
        else:
            origin = _origin(module_name)
            if _in_project(origin):
                assert origin is not None
                package = (
                    module_name.rpartition(".")[0]
                    if not origin.endswith("__init__.py")
                    else module_name
                )
                module = _import_slice(origin, module_name, target, package, arch)
            else:
                module = importlib.import_module(module_name)
    except (ImportError, AttributeError, SyntaxError, OSError) as exc:
        raise ConfigError(f"cannot import architecture {arch!r}: {exc}") from None
    obj: Any = module
    done: list[str] = []
    for part in attr.split("."):
        if not hasattr(obj, part):
            # said in the user's terms: a script's private module name means nothing to them
            owner = ":".join([module_name, ".".join(done)]) if done else module_name
            raise ConfigError(_missing(obj, part, owner, module_name))
        obj = getattr(obj, part)
        done.append(part)
    return obj


def module_of(obj: object) -> types.ModuleType | None:
    """The loaded module ``obj`` (a builder class or function) was defined in, if any."""
    return sys.modules.get(getattr(obj, "__module__", None) or "")


def skipped_note(module: types.ModuleType | None, target: str) -> str | None:
    """``train.py: ran only its imports and what Net needs; left out line 7: ...``, or None.

    Says nothing when only unused definitions and constants were left out.
    """
    found = getattr(module, _SLICE_ATTR, None)
    if found is None:
        return None
    part, shown = found
    actions = [s for s in part.skipped if not _is_inert(s)]
    if not actions:
        return None
    more = f" and {len(actions) - 1} more top-level statement(s)" if len(actions) > 1 else ""
    return (
        f"{shown} runs code when imported; tdump ran only its imports and what {target} needs, "
        f"and left out {describe(actions[0])}{more}"
    )


def unmet_hint(module: types.ModuleType | None, name: str) -> str | None:
    """Why a sliced module lacks ``name``: the statement that sets it was left out."""
    found = getattr(module, _SLICE_ATTR, None)
    if found is None:
        return None
    part, shown = found
    node = part.unmet.get(name) or next((s for s in part.skipped if name in binds(s)), None)
    if node is None:
        return None
    return (
        f"{shown} sets {name!r} in code tdump does not run ({describe(node)}); set it at the "
        "top level of the script (a constant or an assignment), pass it to the constructor, "
        "or put the model in its own module"
    )


def _is_inert(node: ast.stmt) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass)) or (
        isinstance(node, (ast.Assign, ast.AnnAssign))
        and not any(isinstance(n, ast.Call) for n in ast.walk(node))
    )


def _missing(owner: Any, name: str, shown: str, module_name: str) -> str:
    """``shown has no class or function 'name'``, with the closest of ``owner``'s public ones."""
    import difflib
    import inspect

    from torch import nn

    found = sorted(
        key
        for key, value in vars(owner).items()
        if not key.startswith("_")
        and (
            isinstance(value, _Named)
            or (isinstance(value, type) and issubclass(value, nn.Module))
            or (inspect.isfunction(value) and inspect.ismodule(owner))  # not a class's methods
        )
    )
    close = difflib.get_close_matches(name, found, n=1)
    if close:
        hint = f"; did you mean {close[0]}? (--arch {module_name}:{close[0]})"
    elif found:
        hint = f"; it has {', '.join(found[:6])}" + (" ..." if len(found) > 6 else "")
    else:
        hint = "; it defines no nn.Module class or function"
    return f"{shown} has no class or function {name!r}{hint}"


def _origin(module_name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _in_project(origin: str | None) -> bool:
    """A ``.py`` file under the current directory: the user's code, not an installed package."""
    return (
        origin is not None
        and origin.endswith(".py")
        and os.path.isfile(origin)
        and os.path.abspath(origin).startswith(os.getcwd() + os.sep)
    )


def _import_slice(
    path: str, shown: str, target: str, package: str | None, arch: str
) -> types.ModuleType:
    """Run what ``target`` needs from ``path`` as a private module (cached per file and name)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    tag = hashlib.sha1(path.encode()).hexdigest()[:8]  # two folders' train.py are two modules
    name = f"_tdump_user_{stem.replace('-', '_').replace('.', '_')}_{target}_{tag}"
    if name in sys.modules:
        return sys.modules[name]
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    tree = ast.parse(source, filename=path)
    if target not in {n for s in tree.body for n in binds(s)}:
        return _definitions_only(tree, path, name, package)  # for the "did you mean" message
    part = slice_for(tree, source, target)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the script's own sibling imports (`from common import ...`)
    module = _new_module(name, path, package)
    setattr(module, _SLICE_ATTR, (part, shown))
    sys.modules[name] = module
    argv, said = sys.argv, io.StringIO()
    sys.argv = [path]  # a needed `args = parser.parse_args()` gets the parser's defaults
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage: said in the one error line
            exec(compile(part.module, path, "exec"), module.__dict__)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        why = _run_failed(exc, path, shown, target, module, said.getvalue())
        raise ConfigError(f"cannot import architecture {arch!r}: {why}") from None
    finally:
        sys.argv = argv
    sys.stderr.write(said.getvalue())  # the script's own warnings, once it ran
    return module


def _definitions_only(
    tree: ast.Module, path: str, name: str, package: str | None
) -> types.ModuleType:
    """Only the classes and functions, unrun: enough to say which ones the file has."""
    module = _new_module(name + "_names", path, package)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            setattr(module, node.name, _Named())
    return module


class _Named:
    """A top-level class or function of a file, by name only (never run)."""


def _new_module(name: str, path: str, package: str | None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = path
    module.__package__ = package
    return module


def _run_failed(
    exc: BaseException, path: str, shown: str, target: str, module: types.ModuleType, said: str
) -> str:
    """One line: where running the slice failed, and for a missing name what left it out."""
    line = next(
        (f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__)) if f.filename == path),
        None,
    )
    where = f" at line {line}" if line is not None else ""
    if isinstance(exc, SystemExit):
        last = said.strip().splitlines()[-1:] or [f"SystemExit {exc.code}"]
        what = f"exited{where} ({last[0]})"
    else:
        what = f"failed{where} ({first_line(exc, None)})"
    msg = f"running what {target} needs from {shown} {what}"
    hint = unmet_hint(module, exc.name) if isinstance(exc, NameError) and exc.name else None
    if hint is None and isinstance(exc, SystemExit):
        hint = (
            f"give what {target} reads a default in the script, or put the model in its own module"
        )
    return f"{msg}: {hint}" if hint else msg
