r"""Importing code the user named (``--arch mymodels:Net``, ``train.py:Net``), safely.

A module of the user's project, or a script given by path, is parsed before it is
imported: if its import would run more than set-up code (a training loop, say) it is
refused with a one-line :class:`~tdump.errors.ConfigError` that says how to fix it.
A script is imported under a private module name, so its ``__main__`` block never
runs. Installed packages are imported as they are. Only names the *user* passes
reach this module (:mod:`tdump.surgery._arch` decides that).

Examples
--------
>>> import ast
>>> tree = ast.parse("import torch\nclass Net: pass\nfor e in range(3): train()")
>>> _first_action(tree.body, set()).lineno
3
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from typing import Any

from tdump.errors import ConfigError

__all__ = ["check_source", "import_attr"]

#: Module names whose top-level calls (``torch.manual_seed(0)``, ``warnings.filterwarnings``) are set-up.
_SETUP_CALLS = ("sys", "os", "warnings", "logging", "torch", "np", "numpy", "random", "matplotlib")


def import_attr(module_name: str, attr: str, arch: str) -> Any:
    """``attr`` (dotted) of module or script ``module_name``; ``arch`` is the name as given.

    A module of the user's project or a script is read first and refused
    (:class:`~tdump.errors.ConfigError`) when importing it would run more than
    set-up code; any import failure is one ``ConfigError`` line.
    """
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # so `mymodels.Net` works from a project root
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            module = _import_file(module_name)
        else:
            if module_name not in sys.modules:
                check_source(_origin(module_name), module_name)
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
            (isinstance(value, type) and issubclass(value, nn.Module))
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


def _import_file(path: str) -> Any:
    """Import a script by path under a private module name, so its ``__main__`` block never runs."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ImportError(f"no file {path}")
    check_source(full, path)
    name = "_tdump_user_" + os.path.splitext(os.path.basename(full))[0].replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the script's own sibling imports (`from common import ...`)
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def check_source(origin: str | None, shown: str) -> None:
    """Refuse a module of the user's project whose import would run more than set-up code."""
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        return
    if not os.path.abspath(origin).startswith(os.getcwd() + os.sep) and not shown.endswith(".py"):
        return  # installed packages are imported as they are
    with open(origin, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=origin)
    bad = _first_action(tree.body, _defined_functions(tree))
    if bad is not None:
        code = ast.unparse(bad).splitlines()[0][:60]
        raise ConfigError(
            f"{shown} runs code when imported (line {bad.lineno}: {code}), so building the model "
            'would re-run your training: move that code under `if __name__ == "__main__":` '
            "or put the model class in its own module"
        )


def _defined_functions(tree: ast.Module) -> set[str]:
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.col_offset == 0
    }


def _is_main_guard(node: ast.If) -> bool:
    t = node.test
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators)
    )


def _calls_own(node: ast.AST, own: set[str]) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in own
        for n in ast.walk(node)
    )


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _first_action(body: list[ast.stmt], own: set[str]) -> ast.stmt | None:
    """The first top-level statement that does work on import (loops, calls, with blocks)."""
    quiet = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in body:
        if isinstance(node, (*quiet, ast.Pass)):
            continue
        if isinstance(node, ast.If):
            if _is_main_guard(node):
                continue
            inner = _first_action(node.body + node.orelse, own)
            if inner is not None:
                return inner
            continue
        if isinstance(node, ast.Try):
            blocks = node.body + node.orelse + node.finalbody
            blocks += [s for h in node.handlers for s in h.body]
            inner = _first_action(blocks, own)
            if inner is not None:
                return inner
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            if _calls_own(node, own):
                return node
            continue
        if isinstance(node, ast.Expr):
            if isinstance(node.value, ast.Constant):
                continue  # docstrings
            if (
                isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and _root_name(node.value.func) in _SETUP_CALLS
            ):
                continue
        return node
    return None
