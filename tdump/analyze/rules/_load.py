"""Rules by name: built-ins, or ``FILE.py:CLASS`` from a file the user named; their parameters.

A rule file is imported only because the user named it (``--rule my_rules.py:Cls``),
under a private module name (never ``__main__``), so an ``if __name__ == "__main__":``
block in it does not run.

Examples
--------
>>> parse_params(["threshold=0.1", "exploding_tensor.mode=eval", "tag=run 3"])
{'threshold': 0.1, 'exploding_tensor.mode': 'eval', 'tag': 'run 3'}
>>> load_rule("dead_relu").cls.__name__
'DeadRelu'
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tdump.analyze.rules._base import Rule, get_builtin
from tdump.errors import ConfigError

__all__ = ["LoadedRule", "load_rule", "parse_params", "split_params"]


@dataclass(frozen=True)
class LoadedRule:
    """A rule class and the name it is reported under."""

    name: str
    cls: type
    source: str

    def accepts(self) -> tuple[list[str], bool]:
        """Keyword parameters of the constructor after ``trial``, and whether it takes ``**kw``."""
        try:
            sig = inspect.signature(self.cls.__init__)  # type: ignore[misc]
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            return [], True
        names, var_kw = [], False
        for i, p in enumerate(sig.parameters.values()):
            if i < 2 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                continue  # self, trial
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.append(p.name)
        # Rule.__init__(trial, **params) refuses extra params itself: not a real **kw
        return names, var_kw and self.cls.__init__ is not Rule.__init__  # type: ignore[misc]


def load_rule(spec: str | type) -> LoadedRule:
    """Resolve ``spec``: a built-in name, ``path/to/file.py:ClassName``, or a class.

    ``file.py`` alone is accepted when the file defines exactly one rule class.

    Raises
    ------
    ConfigError
        Unknown built-in (the message lists them), missing file, a syntax or import
        error in the file, no such class, or a class without ``invoke_at_step``.
    """
    if isinstance(spec, type):
        _check_class(spec, spec.__name__, "")
        return LoadedRule(str(getattr(spec, "name", "") or spec.__name__), spec, "class")
    path, sep, cls_name = spec.rpartition(":")
    if not sep and spec.endswith(".py"):
        path, cls_name = spec, ""
    elif not sep or not (path.endswith(".py") or os.path.isfile(path)):
        return LoadedRule(spec, get_builtin(spec), "builtin")
    module = _import_file(path)
    if not cls_name:
        found = [
            n
            for n, v in vars(module).items()
            if inspect.isclass(v) and v.__module__ == module.__name__ and _is_rule(v)
        ]
        if len(found) != 1:
            raise ConfigError(
                f"rule file {path} defines {len(found)} rule classes ({', '.join(found) or 'none'}); "
                f"name one: --rule {path}:CLASS"
            )
        cls_name = found[0]
    cls: Any = getattr(module, cls_name, None)
    if cls is None:
        classes = [n for n, v in vars(module).items() if inspect.isclass(v) and _is_rule(v)]
        raise ConfigError(
            f"rule file {path} has no class {cls_name!r}; rule classes there: "
            f"{', '.join(classes) or 'none'}"
        )
    _check_class(cls, cls_name, path)
    return LoadedRule(cls_name, cls, path)


def _is_rule(cls: type) -> bool:
    return callable(getattr(cls, "invoke_at_step", None)) and cls is not Rule


def _check_class(cls: Any, name: str, path: str) -> None:
    where = f" in {path}" if path else ""
    if not inspect.isclass(cls):
        raise ConfigError(f"{name}{where} is not a class; a rule is a class with invoke_at_step")
    if not _is_rule(cls) or getattr(cls, "invoke_at_step") is Rule.invoke_at_step:  # noqa: B009
        raise ConfigError(
            f"class {name}{where} has no invoke_at_step(self, step) method; "
            "a rule needs one that returns True when its condition holds"
        )


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"no rule file at {path}; give --rule FILE.py:CLASS or a built-in name")
    full = os.path.abspath(path)
    # a private module name per file: never __main__, never clashing with an installed module
    mod_name = "tdump_user_rules_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, full)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have one
        raise ConfigError(f"cannot import rule file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[mod_name]
        raise ConfigError(
            f"rule file {path} has a syntax error at line {exc.lineno}: {exc.msg}"
        ) from None
    except Exception as exc:
        del sys.modules[mod_name]
        raise ConfigError(
            f"rule file {path} failed to import: {type(exc).__name__}: {exc}"
        ) from None
    return module


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """``["k=v", "Rule.k=v"]`` -> ``{"k": v, "Rule.k": v}``; values are JSON where they parse.

    Raises
    ------
    ConfigError
        An item without ``=`` or with an empty or malformed key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or len(parts) > 2 or not all(p.isidentifier() for p in parts[-1:]):
            raise ConfigError(
                f"bad --param {item!r}; write NAME=VALUE or RULE.NAME=VALUE (e.g. threshold=0.1)"
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key] = value
    return out


def split_params(params: Mapping[str, Any], rules: list[LoadedRule]) -> dict[str, dict[str, Any]]:
    """Hand each rule the parameters meant for it (``RULE.k`` scoped, plain ``k`` if it takes one).

    Raises
    ------
    ConfigError
        A scope names no given rule, a scoped parameter the rule does not take, or a
        plain parameter no rule takes (messages list what the rules take).
    """
    names = [r.name for r in rules]
    out: dict[str, dict[str, Any]] = {r.name: {} for r in rules}
    by_name = {r.name: r for r in rules}
    by_class = {r.cls.__name__: r for r in rules}

    def takes(rule: LoadedRule, key: str) -> bool:
        accepted, var_kw = rule.accepts()
        return var_kw or key in accepted

    def offer(rule: LoadedRule) -> str:
        accepted, var_kw = rule.accepts()
        shown = ", ".join(accepted) or "no parameters"
        return f"{rule.name} takes {shown}{' and any other' if var_kw else ''}"

    for key, value in params.items():
        scope, dot, local = key.rpartition(".")
        if dot:
            rule = by_name.get(scope) or by_class.get(scope)
            if rule is None:
                raise ConfigError(
                    f"--param {key}: no rule {scope!r} among the rules given ({', '.join(names)})"
                )
            if not takes(rule, local):
                raise ConfigError(f"--param {key}: {offer(rule)}")
            out[rule.name][local] = value
            continue
        takers = [r for r in rules if takes(r, key)]
        if not takers:
            raise ConfigError(
                f"--param {key}: no rule given takes it ({'; '.join(offer(r) for r in rules)})"
            )
        for r in takers:
            out[r.name][key] = value
    return out
