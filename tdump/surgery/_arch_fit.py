"""Which registered builder, and which keywords, make a model that fits a state_dict.

A plain ``torch.save(model.state_dict())`` names neither its architecture nor the
keywords it was built with. tdump builds candidates on the meta device (no memory, no
initial values) and compares their state-dict shapes with the checkpoint's: the
recorded model's class picks the builder (:func:`arch_for_type`), a changed classifier
gives ``num_classes`` (:func:`infer_num_classes`), and a ViT's position embedding gives
``image_size`` (:func:`infer_image_size`).

Examples
--------
>>> import torchvision
>>> sd = torchvision.models.vit_b_32(num_classes=10, image_size=64).state_dict()
>>> infer_num_classes(torchvision.models.vit_b_32, {}, sd), infer_image_size(
...     torchvision.models.vit_b_32, {}, sd)
(10, 64)
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from tdump.errors import first_line
from tdump.surgery._arch import Builder, no_downloads, registered_archs

__all__ = [
    "INFERRED_FROM",
    "ArchGuess",
    "arch_for_type",
    "infer_image_size",
    "infer_kwargs",
    "infer_num_classes",
]


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


class _Meta(NamedTuple):
    """A builder's model, built without weights: what comparing it needs."""

    kind: str  # the model's class, ``module.qualname``
    shapes: dict[str, tuple[int, ...]]  # state-dict shapes
    sizes: dict[str, int]  # the input-size attributes a ViT keeps (image_size, patch_size)


#: Integer attributes of the built model that :func:`infer_image_size` reads.
_SIZE_ATTRS = ("image_size", "patch_size")


@functools.lru_cache(maxsize=256)
def _meta_info(builder: Builder, kwargs_json: str) -> _Meta | str:
    """What ``builder(**kwargs)`` makes, or why it cannot be built.

    Built on the meta device, which allocates nothing and skips the weights' initial
    values, so comparing a dozen candidate architectures costs little; a builder that
    computes with tensors (RegNet) is built again on the CPU with only its weights on
    the meta device. Results are cached.
    """
    kwargs = no_downloads(builder, json.loads(kwargs_json))
    try:
        with torch.device("meta"):
            model = builder(**kwargs)
    except Exception:  # tensors computed while building (RegNet): weights on meta only
        try:
            with _weights_on_meta():
                model = builder(**kwargs)
        except Exception as exc:  # cannot build with these arguments: nothing to infer
            return f"{type(exc).__name__}: {first_line(exc, 100)}"
    if not isinstance(model, nn.Module):
        return f"returned a {type(model).__name__}, not an nn.Module"
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sizes = {a: v for a in _SIZE_ATTRS if type(v := getattr(model, a, None)) is int}
    return _Meta(kind, shapes, sizes)


def _meta(builder: Builder, kwargs: Mapping[str, Any]) -> _Meta | None:
    info = _meta_info(builder, json.dumps(dict(kwargs), sort_keys=True))
    return None if isinstance(info, str) else info


def _shapes(builder: Builder, kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    info = _meta(builder, kwargs)
    return None if info is None else info.shapes


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


def infer_image_size(
    builder: Builder, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> int | None:
    """``image_size`` a ViT's state_dict says, when it differs from the builder's default.

    A vision transformer's position embedding holds one row per image patch plus the
    class token, so its length gives the side of the patch grid; times the model's
    ``patch_size`` that is the image size it was built for. The size found is checked
    by building the model with it. ``None`` for models without an ``image_size``
    (everything but ViT in torchvision), when the keyword is given, or when the sizes
    already match.

    Examples
    --------
    >>> import torchvision
    >>> sd = torchvision.models.vit_b_16(image_size=96).state_dict()
    >>> infer_image_size(torchvision.models.vit_b_16, {}, sd)
    96
    """
    if "image_size" in kwargs:
        return None
    base = _meta(builder, kwargs)
    if base is None or set(base.sizes) != set(_SIZE_ATTRS):
        return None
    # the one changed tensor must be an embedding (1, patches + 1, width) of another length
    changed = [
        k
        for k, s in base.shapes.items()
        if k in state and tuple(state[k].shape) != s and len(s) == 3 and s[0] == 1
    ]
    if len(changed) != 1:
        return None
    key = changed[0]
    got = tuple(state[key].shape)
    side = math.isqrt(max(got[1] - 1, 0))
    if got[2] != base.shapes[key][2] or side < 1 or side * side != got[1] - 1:
        return None
    size = side * base.sizes["patch_size"]
    shapes = _shapes(builder, {**kwargs, "image_size": size})
    return size if shapes is not None and shapes.get(key) == got else None


#: What each keyword :func:`infer_kwargs` may find is read from, for the notes.
INFERRED_FROM = {
    "num_classes": "the state_dict's classifier",
    "image_size": "the state_dict's position embedding",
}


def infer_kwargs(
    builder: Builder, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """The builder keywords ``state`` says and ``kwargs`` does not give.

    Each is a key of :data:`INFERRED_FROM`: ``num_classes`` (:func:`infer_num_classes`)
    and ``image_size`` (:func:`infer_image_size`).

    Examples
    --------
    >>> import torchvision
    >>> sd = torchvision.models.resnet18(num_classes=7).state_dict()
    >>> infer_kwargs(torchvision.models.resnet18, {}, sd)
    {'num_classes': 7}
    """
    found = {
        "num_classes": infer_num_classes(builder, kwargs, state),
        "image_size": infer_image_size(builder, kwargs, state),
    }
    return {k: v for k, v in found.items() if v is not None}


def _public_names(archs: Mapping[str, Builder]) -> dict[int, str]:
    """Per builder, its shortest dotted registered name (``torchvision.models.resnet18``)."""
    best: dict[int, str] = {}
    for name, fn in archs.items():
        key = id(fn)
        dots = name.count(".")
        if key not in best or (dots and (not best[key].count(".") or dots < best[key].count("."))):
            best[key] = name
    return best


class ArchGuess(NamedTuple):
    """:func:`arch_for_type`'s answer: the builder (``None`` unless exactly one fits), why,
    and the builders that tie when several fit (sorted)."""

    arch: str | None
    why: str
    tied: tuple[str, ...] = ()


def arch_for_type(
    type_name: str, state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]
) -> ArchGuess:
    """The registered builder that makes a ``type_name`` model matching ``state``, and why.

    ``type_name`` is a recorded model's class (a dump's ``modules[""].type``, e.g.
    ``torchvision.models.resnet.ResNet``). Candidates are registered builders from that
    class's module (or the class itself); each is built without weights (meta device) and
    kept when its state_dict has the same keys, and shapes equal to (or, for a pruned
    state_dict, not smaller than) the checkpoint's. Returns ``(None, reason)`` unless
    exactly one fits (with ``tied`` when several do); the reason says when candidates
    raised while being built.

    Examples
    --------
    >>> import torchvision
    >>> sd = torchvision.models.resnet34(num_classes=5).state_dict()
    >>> arch_for_type("torchvision.models.resnet.ResNet", sd, {}).arch
    'torchvision.models.resnet34'
    """
    module = type_name.rpartition(".")[0]
    # torchvision's builders (2-3 s to import) only for its own model types
    archs = registered_archs(torchvision=type_name.startswith("torchvision."))
    names = _public_names(archs)
    seen: dict[int, Builder] = {}
    for fn in archs.values():
        own = f"{fn.__module__}.{fn.__qualname__}" if isinstance(fn, type) else None
        if own == type_name or (own is None and getattr(fn, "__module__", None) == module):
            seen.setdefault(id(fn), fn)
    if not seen:
        return ArchGuess(None, "no registered builder makes it")
    exact, fits, failed = [], [], []
    keys = set(state)
    got = {k: tuple(v.shape) for k, v in state.items()}
    for key, fn in seen.items():
        info = _meta_info(fn, json.dumps(dict(kwargs), sort_keys=True))
        if isinstance(info, str):
            failed.append(f"{names[key]}: {info}")
            continue
        if info.kind != type_name or set(info.shapes) != keys:
            continue
        found = infer_kwargs(fn, kwargs, state)
        shapes = (_shapes(fn, {**kwargs, **found}) if found else info.shapes) or {}
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
        return ArchGuess(
            picked, f"the recorded model is a {type_name} and {picked} matches the state_dict"
        )
    if exact or fits:
        tied = tuple(sorted(exact or fits))
        return ArchGuess(None, f"several builders match: {', '.join(tied)}", tied)
    if failed:
        rest = len(seen) - len(failed)
        others = f"; the other {rest} do not have the state_dict's keys and shapes" if rest else ""
        return ArchGuess(
            None,
            f"{len(failed)} of {len(seen)} candidate builders raised when built to compare "
            f"(e.g. {sorted(failed)[0]}){others}",
        )
    return ArchGuess(
        None, f"none of {len(seen)} candidate builders has the state_dict's keys and shapes"
    )
