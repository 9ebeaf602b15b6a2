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

import contextlib
import functools
import inspect
import json
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tdump.errors import CheckpointError, ConfigError
from tdump.surgery._user_code import import_attr

__all__ = [
    "Builder",
    "arch_for_type",
    "arch_name",
    "build_arch",
    "check_kwargs",
    "infer_num_classes",
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


def registered_archs() -> dict[str, Builder]:
    """Every name a checkpoint may carry: torchvision builders, then :func:`register_arch` names."""
    return {**_torchvision(), **_USER}


def _known(obj: Any) -> bool:
    return any(obj is b for b in registered_archs().values())


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
    for name, fn in registered_archs().items():
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
        known = registered_archs()
        for key in (arch, _canonical(arch)):
            if key in known:
                return known[key]
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
        model = builder(**kw)
    except Exception as exc:
        raise ConfigError(
            f"cannot construct {shown}(**{json.dumps(kw)}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{shown} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Parameters and buffers go to the meta device as modules register them.

    For builders that compute with tensors while they build (RegNet's block widths:
    ``.tolist()`` of a tensor), which the meta device refuses: everything else stays on
    the CPU, and the weights are neither kept nor initialised. Uses torch's global
    registration hooks while the builder runs, so only a builder that failed on the
    meta device is built this way; the hooks act on this thread's modules only (a
    model another thread builds meanwhile keeps its weights).
    """
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    owner = threading.get_ident()

    def param(module: nn.Module, name: str, value: nn.Parameter | None) -> nn.Parameter | None:
        if value is None or threading.get_ident() != owner:
            return None  # None: registered unchanged
        return nn.Parameter(value.to("meta"), value.requires_grad)

    def buffer(module: nn.Module, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
        if value is None or threading.get_ident() != owner:
            return None
        return value.to("meta")

    # torch documents that such a hook may return the value to register; its annotation
    # (Callable[..., None]) does not say so
    handles = [
        register_module_parameter_registration_hook(param),  # type: ignore[arg-type]
        register_module_buffer_registration_hook(buffer),  # type: ignore[arg-type]
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:100] if text else type(exc).__name__


@functools.lru_cache(maxsize=256)
def _meta_info(builder: Builder, kwargs_json: str) -> tuple[str, dict[str, tuple[int, ...]]] | str:
    """Class name and state-dict shapes of ``builder(**kwargs)``, or why it cannot be built.

    Built on the meta device, which allocates nothing and skips the weights' initial
    values, so comparing a dozen candidate architectures costs little; a builder that
    computes with tensors (RegNet) is built again on the CPU with only its weights on
    the meta device. Results are cached.
    """
    kwargs = json.loads(kwargs_json)
    try:
        with torch.device("meta"):
            model = builder(**kwargs)
    except Exception:  # tensors computed while building (RegNet): weights on meta only
        try:
            with _weights_on_meta():
                model = builder(**kwargs)
        except Exception as exc:  # cannot build with these arguments: nothing to infer
            return f"{type(exc).__name__}: {_first_line(exc)}"
    if not isinstance(model, nn.Module):
        return f"returned a {type(model).__name__}, not an nn.Module"
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    return kind, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes(builder: Builder, kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    info = _meta_info(builder, json.dumps(dict(kwargs), sort_keys=True))
    return None if isinstance(info, str) else info[1]


def infer_num_classes(
    builder: Builder, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> int | None:
    """``num_classes`` the state_dict's head says, when it differs from the builder's default.

    The head is found by building the architecture twice on the meta device with two
    class counts and seeing which tensors change; ``None`` when nothing needs changing
    or the builder takes no ``num_classes``.

    Examples
    --------
    >>> import torchvision
    >>> sd = torchvision.models.resnet18(num_classes=7).state_dict()
    >>> infer_num_classes(torchvision.models.resnet18, {}, sd)
    7
    """
    if "num_classes" in kwargs:
        return None
    base = _shapes(builder, kwargs)
    probe = _shapes(builder, {**kwargs, "num_classes": 3})
    if base is None or probe is None:
        return None
    head = [k for k, s in base.items() if k in probe and probe[k] != s and k in state]
    found = {int(state[k].shape[0]) for k in head if state[k].ndim == len(base[k])}
    default = {base[k][0] for k in head}
    if len(found) != 1 or found == default:
        return None
    return found.pop()


def _public_names() -> dict[int, str]:
    """Per builder, its shortest dotted registered name (``torchvision.models.resnet18``)."""
    best: dict[int, str] = {}
    for name, fn in registered_archs().items():
        key = id(fn)
        dots = name.count(".")
        if key not in best or (dots and (not best[key].count(".") or dots < best[key].count("."))):
            best[key] = name
    return best


def arch_for_type(
    type_name: str, state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]
) -> tuple[str | None, str]:
    """The registered builder that makes a ``type_name`` model matching ``state``, and why.

    ``type_name`` is a recorded model's class (a dump's ``modules[""].type``, e.g.
    ``torchvision.models.resnet.ResNet``). Candidates are registered builders from that
    class's module (or the class itself); each is built without weights (meta device) and
    kept when its state_dict has the same keys, and shapes equal to (or, for a pruned
    state_dict, not smaller than) the checkpoint's. Returns ``(None, reason)`` unless
    exactly one fits; the reason says when candidates raised while being built.

    Examples
    --------
    >>> import torchvision
    >>> sd = torchvision.models.resnet34(num_classes=5).state_dict()
    >>> arch_for_type("torchvision.models.resnet.ResNet", sd, {})[0]
    'torchvision.models.resnet34'
    """
    module = type_name.rpartition(".")[0]
    names = _public_names()
    seen: dict[int, Builder] = {}
    for fn in registered_archs().values():
        own = f"{fn.__module__}.{fn.__qualname__}" if isinstance(fn, type) else None
        if own == type_name or (own is None and getattr(fn, "__module__", None) == module):
            seen.setdefault(id(fn), fn)
    if not seen:
        return None, "no registered builder makes it"
    exact, fits, failed = [], [], []
    keys = set(state)
    for key, fn in seen.items():
        info = _meta_info(fn, json.dumps(dict(kwargs), sort_keys=True))
        if isinstance(info, str):
            failed.append(f"{names[key]}: {info}")
            continue
        if info[0] != type_name or set(info[1]) != keys:
            continue
        n = infer_num_classes(fn, kwargs, state)
        shapes = (_shapes(fn, {**kwargs, "num_classes": n}) if n else info[1]) or {}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got == shapes:
            exact.append(names[key])
        elif all(
            len(got[k]) == len(s) and all(a <= b for a, b in zip(got[k], s, strict=True))
            for k, s in shapes.items()
            if k in got and not k.endswith("num_batches_tracked")
        ):
            fits.append(names[key])
    if len(exact) == 1 or (not exact and len(fits) == 1):
        picked = (exact or fits)[0]
        return picked, f"the recorded model is a {type_name} and {picked} matches the state_dict"
    if exact or fits:
        return None, f"several builders match: {', '.join(sorted(exact or fits))}"
    if failed:
        rest = len(seen) - len(failed)
        others = f"; the other {rest} do not have the state_dict's keys and shapes" if rest else ""
        return None, (
            f"{len(failed)} of {len(seen)} candidate builders raised when built to compare "
            f"(e.g. {sorted(failed)[0]}){others}"
        )
    return None, f"none of {len(seen)} candidate builders has the state_dict's keys and shapes"
