"""Which architectures tdump may build, and how: a registry, never an import path read from a file.

A checkpoint names its architecture (``arch``) and keyword arguments. tdump calls a
builder named in a file only when it is *registered*: a torchvision model builder
(``torchvision.models.list_models()``, under its short name, its public path such as
``torchvision.models.resnet18``, or its module path) or a name added with
:func:`register_arch`. An import path the *user* passes (``--arch``, ``arch=``) is
trusted: it is imported, and the object found must be an ``nn.Module`` class, a
registered builder, or a function annotated to return an ``nn.Module``. A user's
script (``train.py:Net``) is imported under its own name, never as ``__main__``, and
refused if importing it would run code beyond definitions (its training).

Examples
--------
>>> from torch import nn
>>> register_arch("tiny", lambda width=2: nn.Sequential(nn.Conv2d(3, width, 1)))
>>> build_arch("tiny", {"width": 4}, trusted=False)[0].out_channels
4
>>> build_arch("os.system", {"command": "true"}, trusted=False)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tdump.errors.CheckpointError: the checkpoint names architecture 'os.system', which is not a registered model builder; ...
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from tdump.errors import CheckpointError, ConfigError, first_line
from tdump.surgery._user_code import import_attr, module_of, unmet_hint

__all__ = [
    "Builder",
    "arch_name",
    "build_arch",
    "check_kwargs",
    "is_registered_arch",
    "no_downloads",
    "register_arch",
    "registered_archs",
    "resolve_arch",
    "same_arch",
]

Builder = Callable[..., nn.Module]
_USER: dict[str, Builder] = {}
#: Keyword arguments a file may not pass to a builder: torchvision would download weights.
_NO_FILE_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def register_arch(name: str, builder: Builder) -> None:
    """Allow checkpoints to name ``name``: ``builder(**arch_kwargs)`` must return an ``nn.Module``.

    Use the name your checkpoints carry (``tdump.surgery.save(..., arch=name)``), e.g.
    ``register_arch("mypkg.models.Net", Net)``; a later registration replaces an earlier one.

    Examples
    --------
    >>> from torch import nn
    >>> register_arch("doc.Linear", nn.Linear)
    >>> "doc.Linear" in registered_archs()
    True
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_arch needs a non-empty name, got {name!r}")
    if not callable(builder):
        raise ConfigError(f"register_arch({name!r}, ...) needs a callable builder, got {builder!r}")
    _USER[name] = builder


@functools.lru_cache(maxsize=1)
def _torchvision() -> dict[str, Builder]:
    try:
        import torchvision.models as tvm
    except ImportError:  # torchvision is optional for tdump itself
        return {}
    out: dict[str, Builder] = {}
    for name in tvm.list_models():
        found: Any = tvm.get_model_builder(name)
        out[name] = found
        out[f"{found.__module__}.{found.__name__}"] = found
        pkg = str(found.__module__)
        while "." in pkg:
            pkg = pkg.rpartition(".")[0]
            public = getattr(sys.modules.get(pkg), found.__name__, None) is found
            if public:
                out[f"{pkg}.{found.__name__}"] = found
    return out


def registered_archs(*, torchvision: bool = True) -> dict[str, Builder]:
    """Every name a checkpoint may carry: torchvision builders, then :func:`register_arch` names.

    ``torchvision=False`` lists the :func:`register_arch` names alone, without importing
    torchvision.
    """
    return {**_torchvision(), **_USER} if torchvision else dict(_USER)


# Importing torchvision.models costs 2-3 s; a name or builder that cannot be torchvision's
# (train.py:Net, mypkg.Net, a class of the script) is looked up among the user's only.
def _maybe_torchvision(name: str) -> bool:
    canonical = _canonical(name)
    return canonical.isidentifier() or canonical.startswith("torchvision.")


def _builders_like(obj: Any) -> dict[str, Builder]:
    """The registered names ``obj`` (a builder) could be among."""
    return registered_archs(
        torchvision=str(getattr(obj, "__module__", "")).startswith("torchvision.")
    )


def is_registered_arch(name: str) -> bool:
    """Whether ``name`` is a registered builder (looked up, never imported).

    >>> is_registered_arch("resnet18"), is_registered_arch("train.py:Net")
    (True, False)
    """
    return _registered(name) is not None


def _registered(name: str) -> Builder | None:
    known = registered_archs(torchvision=_maybe_torchvision(name))
    for key in (name, _canonical(name)):
        if key in known:
            return known[key]
    return None


def _known(obj: Any) -> bool:
    return any(obj is b for b in _builders_like(obj).values())


def _canonical(arch: str) -> str:
    return arch.replace(":", ".") if arch.count(":") == 1 and "/" not in arch else arch


def same_arch(a: str | None, b: str) -> bool:
    """Whether two names spell one builder: ``pkg.mod:Cls`` (``--arch``) and ``pkg.mod.Cls``.

    >>> same_arch("torchvision.models.vision_transformer:VisionTransformer",
    ...           "torchvision.models.vision_transformer.VisionTransformer")
    True
    """
    return a is not None and _canonical(a) == _canonical(b)


def _refuse(arch: str, where: str, load_args: str | None) -> CheckpointError:
    # the class's own name for the Python fix (``arch=Net``): a file's name is never imported
    attr = arch.rpartition(":" if ":" in arch else ".")[2].rpartition(".")[2]
    cls = attr if attr.isidentifier() else "YourModel"
    python = f"tdump.load({load_args}, arch={cls})" if load_args else f"arch={cls}"
    return CheckpointError(
        f"{where} names architecture {arch!r}, which is not a registered model builder; "
        "tdump never imports a name read from a file: if you trust it pass --arch "
        f"{arch} (in Python {python} with the class itself, or arch={arch!r}), "
        f"or call tdump.surgery.register_arch({arch!r}, {cls})"
    )


def arch_name(arch: str | Builder) -> str:
    """The name a checkpoint records for ``arch`` (a name, a model class or a builder).

    >>> from torch import nn
    >>> arch_name(nn.Linear)
    'torch.nn.modules.linear.Linear'
    """
    if isinstance(arch, str):
        return arch
    for name, fn in _builders_like(arch).items():
        if fn is arch and name.count("."):
            return name
    return f"{getattr(arch, '__module__', '?')}.{getattr(arch, '__qualname__', repr(arch))}"


def resolve_arch(
    arch: str | Builder,
    *,
    trusted: bool,
    where: str = "the checkpoint",
    load_args: str | None = None,
) -> Builder:
    """Return the builder of ``arch``; import it only when ``trusted`` (the user named it).

    ``arch`` may also be the model class (or builder) itself, which is trusted. ``where``
    names the file ``arch`` was read from; ``load_args`` (``'ft.pt', like='pruned.pt'``)
    are the arguments of the :func:`tdump.load` call a refusal shows Python users.

    Raises
    ------
    CheckpointError
        ``arch`` came from a file (``trusted=False``) and is not registered.
    ConfigError
        A trusted name that cannot be imported or is not a model builder.
    """
    obj: Any = arch
    if isinstance(arch, str) and arch:
        found = _registered(arch)
        if found is not None:
            return found
        if not trusted:
            raise _refuse(arch, where, load_args)
        obj = _import(arch)
    elif not callable(arch):
        raise ConfigError(f"an architecture must be a name or a model class, got {arch!r}")
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    if _known(obj) or (inspect.isfunction(obj) and _returns_module(obj)):
        return obj  # type: ignore[no-any-return]
    raise ConfigError(
        f"--arch {arch_name(arch)} is a {type(obj).__name__}, not an nn.Module class or a model builder; "
        "name a model class, annotate your builder '-> nn.Module', or register it with "
        "tdump.surgery.register_arch"
    )


def _returns_module(fn: Any) -> bool:
    try:
        ret = inspect.signature(fn, eval_str=True).return_annotation
    except Exception:  # unresolvable annotations: not provably a builder
        return False
    return isinstance(ret, type) and issubclass(ret, nn.Module)


def _split(arch: str) -> tuple[str, str]:
    if ":" in arch:
        module, _, attr = arch.rpartition(":")
    else:
        module, _, attr = arch.rpartition(".")
    if not module or not attr:
        import difflib

        close = difflib.get_close_matches(arch, registered_archs(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"--arch {arch!r} is neither a registered builder (a torchvision model name such as "
            f"resnet18) nor an import path like mymodels:Net or train.py:Net; {hint}".rstrip("; ")
        )
    return module, attr


def _import(arch: str) -> Any:
    module_name, attr = _split(arch)
    return import_attr(module_name, attr, arch)


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def check_kwargs(kwargs: Any, where: str, *, from_file: bool) -> dict[str, Any]:
    """Return ``kwargs`` as a dict after checking it holds only JSON-like values.

    A file may not pass ``weights``/``pretrained`` (a builder would download them).
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not _is_plain(dict(kwargs)):
        raise CheckpointError(
            f"{where}: arch_kwargs must be a dict of plain values (str, numbers, bool, None, lists, dicts), "
            f"got {json.dumps(kwargs, default=lambda o: type(o).__name__)[:120]}"
        )
    out = dict(kwargs)
    if from_file:
        bad = [k for k in _NO_FILE_KWARGS if out.get(k) not in (None, False)]
        if bad:
            raise CheckpointError(
                f"{where}: arch_kwargs sets {bad[0]}={out[bad[0]]!r}, which would download weights; "
                "tdump takes the weights from the checkpoint: remove it or pass --arch-kwargs"
            )
    return out


def build_arch(
    arch: str | Builder,
    kwargs: Mapping[str, Any] | None = None,
    *,
    trusted: bool = True,
    kwargs_checked: bool = False,
) -> nn.Module:
    """Construct ``arch`` with ``kwargs``; only registered builders unless ``trusted``.

    ``trusted=True`` (the default, for names a user typed) imports ``pkg.module.Class``,
    ``pkg.module:factory``, ``mymodels:Net`` (from the current directory) or
    ``path/train.py:Net``; ``trusted=False`` (names read from a checkpoint) only
    looks ``arch`` up in :func:`registered_archs`. ``kwargs`` must be plain values
    (checked with :func:`check_kwargs` unless ``kwargs_checked``).

    Raises
    ------
    CheckpointError, ConfigError
    """
    builder = resolve_arch(arch, trusted=trusted)
    shown = arch_name(arch)
    kw = (
        dict(kwargs or {}) if kwargs_checked else check_kwargs(kwargs, shown, from_file=not trusted)
    )
    try:
        model = builder(**no_downloads(builder, kw))
    except Exception as exc:
        hint = (
            unmet_hint(module_of(builder), exc.name)
            if isinstance(exc, NameError) and exc.name
            else None
        )
        raise ConfigError(
            f"cannot construct {shown}(**{json.dumps(kw)}): {first_line(exc, None)}"
            + (f"; {hint}" if hint else "")
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{shown} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def no_downloads(builder: Builder, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``weights_backbone=None`` where the builder would otherwise download
    a backbone's weights by default (torchvision's detection models): the checkpoint holds
    every weight. What the user passed is kept.

    >>> import torchvision
    >>> no_downloads(torchvision.models.detection.fcos_resnet50_fpn, {"num_classes": 3})
    {'num_classes': 3, 'weights_backbone': None}
    """
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return kwargs
    out = dict(kwargs)
    if "weights_backbone" in params and "weights_backbone" not in out:
        out["weights_backbone"] = None
    return out
