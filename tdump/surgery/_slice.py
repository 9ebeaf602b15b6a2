r"""The part of a user's script that defines one model: what ``--arch train.py:Net`` runs.

A training script often parses arguments, loads data and trains at its top level, so
importing it would train again. tdump runs a *slice* of it instead: the imports and
set-up calls (``sys.path.insert``, ``torch.manual_seed``), the class or function named,
and, transitively, the top-level definitions and assignments that it reads (its base
classes and blocks, helpers, ``WIDTH = 64``, an ``args`` it reads, with the parser's
``add_argument`` calls). Everything else (loops, ``with`` blocks, calls, assignments
nothing needed) is left out and listed, so the model is built as the script defines it
and nothing trains. A needed assignment runs with ``sys.argv`` set to the script alone,
so an ``args = parser.parse_args()`` the model reads gives the parser's defaults.

Examples
--------
>>> src = '''
... import argparse
... from torch import nn
... WIDTH = 4
... p = argparse.ArgumentParser()
... class Net(nn.Module):
...     def __init__(self):
...         super().__init__(); self.c = nn.Conv2d(1, WIDTH, 3)
... for epoch in range(3):
...     train()
... '''
>>> part = slice_for(ast.parse(src), src, "Net")
>>> [s.lineno for s in part.module.body]
[2, 3, 4, 6]
>>> [s.lineno for s in part.skipped]
[5, 9]
"""

from __future__ import annotations

import ast
import builtins
import symtable
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Slice", "binds", "describe", "is_main_guard", "slice_for"]

#: Roots of top-level calls that are set-up (``sys.path.insert``, ``torch.manual_seed``): always run.
SETUP_CALLS = ("sys", "os", "warnings", "logging", "torch", "np", "numpy", "random", "matplotlib")
#: ... unless they write, delete, exit or wait for other processes (``torch.save(...)``).
_NOT_SETUP = frozenset(
    [
        "save",
        "savez",
        "savetxt",
        "load",
        "remove",
        "unlink",
        "rmdir",
        "removedirs",
        "makedirs",
        "mkdir",
        "rename",
        "replace",
        "system",
        "exit",
        "abort",
        "kill",
        "popen",
        "fork",
        "init_process_group",
        "barrier",
        "spawn",
    ]
)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
_COMPS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_BY_NEED = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Assign,
    ast.AnnAssign,
    ast.AugAssign,
    ast.If,
    ast.Try,
)


@dataclass
class Slice:
    """The statements of a module that define ``target``, ready to compile.

    ``module`` keeps the source's line numbers (tracebacks point at the script);
    ``skipped`` lists the top-level statements left out (not the main guard);
    ``unmet`` maps a name the target reads to the statement that binds it but
    cannot run on its own (a loop, a ``with`` block), for the error if it is missing.
    """

    module: ast.Module
    skipped: list[ast.stmt] = field(default_factory=list)
    unmet: dict[str, ast.stmt] = field(default_factory=dict)


def is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``."""
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators)
    )


def describe(node: ast.stmt) -> str:
    """``line 7: p.add_argument('--epochs', ...)``: a statement as a message quotes it."""
    code = ast.unparse(node).splitlines()[0]
    return f"line {node.lineno}: {code if len(code) <= 60 else code[:57] + '...'}"


def slice_for(tree: ast.Module, source: str, target: str) -> Slice:
    """The statements of ``tree`` that top-level name ``target`` needs, in source order."""
    body = tree.body
    globals_of = _def_globals(source)
    binders: dict[str, list[int]] = {}
    touchers: dict[str, list[int]] = {}  # `p.add_argument(...)`, `CFG["x"] = 1`: configure a name
    for i, node in enumerate(body):
        for name in binds(node):
            binders.setdefault(name, []).append(i)
        root = _configures(node)
        if root is not None:
            touchers.setdefault(root, []).append(i)
    imported = {n for i, node in enumerate(body) if _is_import(node) for n in binds(node)}
    known = imported | set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__"}
    kept: set[int] = set()
    queue: deque[str] = deque([target])
    for i, node in enumerate(body):
        if _always(node, known):
            kept.add(i)
            queue.extend(_reads(node, globals_of))
    unmet: dict[str, ast.stmt] = {}
    seen: set[str] = set()
    while queue:
        name = queue.popleft()
        if name in seen:
            continue
        seen.add(name)
        found = binders.get(name, [])
        runnable = [i for i in found if _runs_by_need(body[i])]
        if found and not runnable:
            unmet[name] = body[found[0]]
        first = min(runnable, default=None)
        extra = [i for i in touchers.get(name, []) if first is not None and i > first]
        for i in runnable + extra:
            if i not in kept:
                kept.add(i)
                queue.extend(_reads(body[i], globals_of))
    module = ast.Module(body=[body[i] for i in sorted(kept)], type_ignores=[])
    skipped = [n for i, n in enumerate(body) if i not in kept and not is_main_guard(n)]
    return Slice(module, skipped, unmet)


def _is_import(node: ast.AST) -> bool:
    return isinstance(node, (ast.Import, ast.ImportFrom))


def _always(node: ast.stmt, known: set[str]) -> bool:
    """Imports, docstrings, set-up calls over imported names, try/if blocks of imports."""
    if _is_import(node):
        return True
    if isinstance(node, ast.Expr):
        if isinstance(node.value, ast.Constant):
            return True
        call = node.value
        return (
            isinstance(call, ast.Call)
            and _root(call.func) in SETUP_CALLS
            and not (isinstance(call.func, ast.Attribute) and call.func.attr in _NOT_SETUP)
            and _free_loads(call) <= known
        )
    if isinstance(node, (ast.If, ast.Try)) and not is_main_guard(node):
        # `try: import apex / except ImportError: apex = None`, `if sys.version_info...`:
        # imports and plain values under a test of imported names, nothing called
        inner = list(ast.walk(node))
        test = _free_loads(node.test) if isinstance(node, ast.If) else set()
        calls = [
            n for s in inner if isinstance(s, (ast.Assign, ast.AnnAssign)) for n in ast.walk(s)
        ]
        return (
            any(_is_import(n) for n in inner)
            and _quiet(node)
            and test <= known
            and not any(isinstance(n, ast.Call) for n in calls)
        )
    return False


def _runs_by_need(node: ast.stmt) -> bool:
    """Definitions, assignments and quiet if/try blocks; never loops, with blocks or the main guard."""
    if isinstance(node, ast.Expr):
        return True  # only reached as a configuring call of a needed name
    if not isinstance(node, _BY_NEED) or is_main_guard(node):
        return False
    return not isinstance(node, (ast.If, ast.Try)) or _quiet(node)


def _quiet(node: ast.If | ast.Try) -> bool:
    """A block of only imports, definitions, assignments and ``pass`` (``try: import x``)."""
    inner: list[ast.stmt] = []
    if isinstance(node, ast.If):
        inner = node.body + node.orelse
    else:
        inner = (
            node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        )
    for s in inner:
        if isinstance(s, (ast.If, ast.Try)):
            if not _quiet(s):
                return False
        elif not isinstance(s, (*_BY_NEED, ast.Import, ast.ImportFrom, ast.Pass)):
            return False
    return True


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _configures(node: ast.stmt) -> str | None:
    """The name a statement configures in place: ``p.add_argument(...)``, ``CFG["w"] = 4``."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        return _root(func) if isinstance(func, ast.Attribute) else None
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        roots = {_root(t) for t in targets if isinstance(t, (ast.Attribute, ast.Subscript))}
        return roots.pop() if len(roots) == 1 else None
    return None


def binds(node: ast.stmt) -> set[str]:
    """Top-level names a statement binds (imports, definitions, assignment targets, blocks)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)):
        targets = [node.target]
    elif isinstance(node, (ast.With, ast.AsyncWith)):
        targets = [i.optional_vars for i in node.items if i.optional_vars is not None]
    out = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and not isinstance(node.target, ast.Name):
        out = set()
    if isinstance(
        node, (ast.If, ast.Try, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)
    ):
        for field_name in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, field_name, []):
                stmts = child.body if isinstance(child, ast.ExceptHandler) else [child]
                for s in stmts:
                    out |= binds(s)
    return out


def _reads(node: ast.stmt, globals_of: dict[tuple[str, int], set[str]]) -> set[str]:
    """Global names a statement needs: when it runs and, for a definition, when it is called."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        parts: list[ast.AST] = [*node.decorator_list, *a.defaults]
        parts += [d for d in a.kw_defaults if d is not None]
        parts += [x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs] if x.annotation]
        parts += [node.returns] if node.returns is not None else []
        return set().union(*map(_free_loads, parts)) | globals_of.get(
            (node.name, node.lineno), set()
        )
    if isinstance(node, ast.ClassDef):
        parts = [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
        return set().union(*map(_free_loads, parts)) | globals_of.get(
            (node.name, node.lineno), set()
        )
    return _free_loads(node)


def _free_loads(node: ast.AST) -> set[str]:
    """Names ``node`` reads from outside itself (a lambda's or comprehension's own names excluded)."""
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) else set()
    out: set[str] = set()
    for child in ast.iter_child_nodes(node):
        out |= _free_loads(child)
    if isinstance(node, (*_SCOPES, *_COMPS)):
        own = {
            n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        }
        own |= {x.arg for x in ast.walk(node) if isinstance(x, ast.arg)}
        out -= own
    return out


def _def_globals(source: str) -> dict[tuple[str, int], set[str]]:
    """Per top-level function or class (name, line): the globals its body reads, at any depth."""
    out: dict[tuple[str, int], set[str]] = {}
    for table in symtable.symtable(source, "<tdump>", "exec").get_children():
        found: set[str] = set()
        stack = [table]
        while stack:
            t = stack.pop()
            found |= {s.get_name() for s in t.get_symbols() if s.is_global()}
            stack.extend(t.get_children())
        out[(table.get_name(), table.get_lineno())] = found
    return out
