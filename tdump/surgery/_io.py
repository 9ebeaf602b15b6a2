"""Load and save models: a checkpoint (tdump, state_dict, wrapped) -> model, and back.

:func:`load` rebuilds the architecture (only a registered builder, or one the caller
names), gives it the checkpoint's channel counts (from the tdump plan, from
``like=`` the previous round's tdump checkpoint, or inferred from the state_dict's
shapes), then loads the weights strictly. :func:`save` writes a tdump checkpoint.

Examples
--------
>>> import os, tempfile, torch, torchvision
>>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> save(path, torchvision.models.resnet18(num_classes=3), arch="torchvision.models.resnet18",
...      arch_kwargs={"num_classes": 3})
>>> model = load(path)
>>> model.load_state_dict(torch.load(path, weights_only=True))  # a tdump checkpoint loads too
<All keys matched successfully>
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdump.errors import CheckpointError, ConfigError
from tdump.surgery._apply import apply_keeps
from tdump.surgery._arch import (
    Builder,
    arch_name,
    build_arch,
    check_kwargs,
    resolve_arch,
    same_arch,
)
from tdump.surgery._arch_fit import INFERRED_FROM, arch_for_type, infer_kwargs
from tdump.surgery._checkpoint import (
    CKPT_FORMAT,
    CheckpointInfo,
    load_state,
    read_checkpoint,
    strip_prefix,
    write_checkpoint,
)
from tdump.surgery._graph import build_graph
from tdump.surgery._plan import LayerPlan, Plan, keeps_for
from tdump.surgery._prefix import auto_prefix, common_prefix
from tdump.surgery._resize import match_dtypes, resize_to
from tdump.surgery._user_code import module_of, skipped_note
from tdump.surgery._weight_norm import refresh_weights, weight_key

__all__ = ["Provenance", "dump_model_type", "load", "provenance", "save"]

_ATTR = "_tdump_provenance"


@dataclass
class Provenance:
    """Where a model came from: set by :func:`load` and :func:`prune`, read by :func:`save`.

    ``plan`` is cumulative: kept indices relative to the architecture's original
    channels. ``notes`` says what :func:`load` inferred (architecture, ``num_classes``,
    a stripped prefix, channel counts).
    """

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    rounds: int = 0
    ignore: str | None = None
    notes: list[str] = field(default_factory=list)
    #: The input shape (batch excluded) the channel graph is traced at, for a forward
    #: that branches on shapes; ``None`` when it was not needed or not known.
    input_shape: tuple[int, ...] | None = None


def provenance(model: nn.Module) -> Provenance:
    """The model's :class:`Provenance` (an empty one for a model tdump did not load or prune)."""
    prov = model.__dict__.get(_ATTR)
    return prov if isinstance(prov, Provenance) else Provenance()


def _unwrap_tdump_checkpoint(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Let ``model.load_state_dict(torch.load("pruned.pt"))`` take a whole tdump checkpoint."""
    inner = state_dict.get(prefix + "state_dict")
    if state_dict.get(prefix + "format") == CKPT_FORMAT and isinstance(inner, dict):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update({prefix + k: v for k, v in inner.items()})


def _fit_shapes(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    ignore: str | None,
    input_shape: tuple[int, ...] | None,
) -> Plan | None:
    """Shrink ``model``'s coupled channels to the state_dict's conv shapes (first n kept)."""
    own = model.state_dict()
    if all(k not in own or own[k].shape == v.shape for k, v in sd.items()):
        return None
    graph = build_graph(model, ignore, input_shape)
    layers: dict[str, LayerPlan] = {}
    for grp in graph.groups:
        keys = [k for k in (weight_key(sd, m) for m in grp.members) if k is not None]
        counts = {int(sd[k].shape[0]) for k in keys}
        if not counts or counts == {grp.size}:
            continue
        n = min(counts)
        if len(counts) > 1 or n > grp.size or n % grp.blocks or grp.frozen:
            raise CheckpointError(
                f"the state_dict's channel counts for {', '.join(grp.members[:3])} ({sorted(counts)} "
                f"of {grp.size}) do not fit the architecture; give the previous round's tdump checkpoint "
                "with --like (like= in Python)"
            )
        per, k = grp.size // grp.blocks, n // grp.blocks
        keep = [b * per + i for b in range(grp.blocks) for i in range(k)]
        for member in grp.members:
            layers[member] = LayerPlan(grp.size, keep)
    plan = Plan(layers=layers)
    try:
        keeps = keeps_for(graph, plan)
    except ConfigError as exc:
        raise CheckpointError(f"cannot infer the pruned shapes: {exc}; use --like") from None
    apply_keeps(model, graph, keeps)
    return plan


_INFERRED = (
    "pruned shapes inferred from the state_dict ({} convs; "
    "kept-channel indices unknown, recorded as 0..n-1)"
)
_PLAN_ATTR = "_tdump_inferred_plan"


def provenance_plan(model: nn.Module) -> Plan:
    """The plan :func:`_apply_with_graph` inferred (an empty one if none)."""
    plan = model.__dict__.pop(_PLAN_ATTR, None)
    return plan if isinstance(plan, Plan) else Plan()


def _apply_with_graph(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    cumulative: Plan,
    ignore: str | None,
    input_shape: tuple[int, ...] | None,
    source: str,
    name: str,
    notes: list[str],
) -> None:
    """Shrink ``model`` through its traced channel graph: the plan's keeps, or inferred ones."""
    if cumulative.layers:
        graph = build_graph(model, ignore, input_shape)
        try:
            keeps = keeps_for(graph, cumulative)
        except ConfigError as exc:
            raise CheckpointError(
                f"{source}: its channel plan does not fit {name}: {exc}"
            ) from None
        apply_keeps(model, graph, keeps)
        return
    inferred = _fit_shapes(model, sd, ignore, input_shape)
    if inferred is not None:
        model.__dict__[_PLAN_ATTR] = inferred
        notes.append(_INFERRED.format(len(inferred.layers)))


def _choose_arch(
    path: str,
    info: CheckpointInfo,
    sd: Mapping[str, torch.Tensor],
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    model_type: str | None,
    notes: list[str],
    like: str | None = None,
) -> tuple[str, dict[str, Any], bool]:
    """``(arch, kwargs, trusted)``: the user's arch wins; a file's must be registered.

    ``info`` is ``like``'s when given (a fine-tuned state_dict takes the previous round's
    architecture), so errors about a name read from a file name that file.
    """
    source = f"{like} (--like)" if like is not None else path
    if arch is not None:
        # "pkg.mod:Cls" (as --arch wrote it) and "pkg.mod.Cls" (a class passed in Python)
        same = same_arch(info.arch, arch)
        if info.arch and not same:
            notes.append(f"--arch {arch} overrides the checkpoint's {info.arch}")
        if arch_kwargs is not None:
            return arch, check_kwargs(arch_kwargs, "--arch-kwargs", from_file=False), True
        kwargs = check_kwargs(info.arch_kwargs if same else {}, source, from_file=True)
        return arch, kwargs, True
    if info.arch:
        load_args = repr(path) + (f", like={like!r}" if like is not None else "")
        # refuses an unregistered name before anything runs
        resolve_arch(info.arch, trusted=False, where=source, load_args=load_args)
        if arch_kwargs is not None:
            return info.arch, check_kwargs(arch_kwargs, "--arch-kwargs", from_file=False), False
        return info.arch, check_kwargs(info.arch_kwargs, source, from_file=True), False
    if model_type:
        guess = arch_for_type(model_type, sd, arch_kwargs or {})
        wrapped = common_prefix(sd)
        if guess.arch is None and wrapped:  # a wrapper's keys (``model.`` of a LightningModule)
            unwrapped = arch_for_type(model_type, strip_prefix(sd, wrapped), arch_kwargs or {})
            if unwrapped.arch is not None:
                guess = unwrapped._replace(why=f"{unwrapped.why}, its keys under {wrapped!r}")
        if guess.arch is not None:
            notes.append(f"architecture {guess.arch} inferred ({guess.why})")
            return guess.arch, dict(arch_kwargs or {}), False
        example = guess.tied[0] if guess.tied else "torchvision.models.resnet18"
        raise CheckpointError(
            f"{path} is a plain state_dict and tdump cannot tell which registered builder of the "
            f"recorded model type {model_type} made it ({guess.why}); pass --arch: a registered name "
            f"(e.g. --arch {example}), or your class or a function that builds the model "
            "(e.g. --arch train.py:Net, --arch train.py:build_model; in Python arch=Net)"
        )
    raise CheckpointError(
        f"{path} is a plain state_dict; say which model it belongs to with --arch "
        "(e.g. --arch torchvision.models.resnet18 --arch-kwargs '{\"num_classes\": 10}'; "
        "in Python arch=, arch_kwargs=), or --like (like=) the previous round's tdump checkpoint"
    )


def _infer_kwargs(
    builder: Builder, kwargs: Mapping[str, Any], sd: Mapping[str, torch.Tensor], notes: list[str]
) -> dict[str, int]:
    """Builder keywords the state_dict says and ``kwargs`` does not; each gets a note."""
    found = infer_kwargs(builder, kwargs, sd)
    notes.extend(f"{k}={v} inferred from {INFERRED_FROM[k]}" for k, v in found.items())
    return found


def _check_plan_shapes(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    plan: Plan,
    shown: str,
    source: str,
    name: str,
    arch_given: bool,
) -> None:
    """Each layer the plan prunes has the kept channel count in ``shown``'s state_dict."""
    mods = dict(model.named_modules())
    fix = "give the matching previous-round checkpoint with --like"
    for layer, lp in plan.layers.items():
        mod = mods.get(layer)  # a conv's output channels, or a Linear's features
        got = getattr(mod, "out_channels", getattr(mod, "out_features", None))
        if got == len(lp.keep):
            continue
        if not isinstance(got, int):
            has = (
                "lacks" if mod is None else f"has as a {type(mod).__name__}, not a conv or Linear,"
            )
            raise CheckpointError(
                f"{source}'s plan prunes {layer}, which {name} {has} so the plan is another "
                f"architecture's; {fix}" + (" or drop --arch" if arch_given else "")
            )
        key = weight_key(sd, layer)
        weight = sd[key] if key is not None else None
        have = (
            f"{shown}'s {layer}.weight has {int(weight.shape[0])} output channels"
            if weight is not None and weight.ndim
            else f"{shown} has no {layer}.weight"
        )
        raise CheckpointError(
            f"{shown} does not have the shapes {source}'s plan gives ({have}; the plan keeps "
            f"{len(lp.keep)} of {lp.channels}); {fix}"
        )


def load(
    path: str | os.PathLike[str],
    arch: str | Builder | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    ignore: str | None = None,
    like: str | os.PathLike[str] | None = None,
    prefix: str | None = None,
    model_type: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Rebuild a model from a checkpoint (weights only; nothing named in a file is imported).

    Parameters
    ----------
    path : path
        A tdump checkpoint, a state_dict (plain ``torch.save(model.state_dict())``,
        pruned or not), or a dict holding one under ``state_dict``/``model``/...
    arch : str or class, optional
        Import path, registered name, or the model class itself (``arch=Net``) of the
        **unpruned** architecture. What you pass is trusted and overrides the file; an ``arch`` read from a file must be a
        registered builder (torchvision's, or :func:`tdump.surgery.register_arch`).
    arch_kwargs : dict, optional
        Keyword arguments of ``arch`` (default: the file's; ``num_classes`` is inferred
        from the state_dict's head when absent).
    ignore : str, optional
        Regex of modules to keep whole when tracing (default: the file's).
    like : path, optional
        The previous round's tdump checkpoint: its architecture and kept channels give
        the shapes of ``path`` (a state_dict saved after fine-tuning a pruned model).
        Without it, a pruned state_dict's channel counts are inferred from its shapes.
    prefix : str, optional
        A wrapper prefix to strip from the state_dict's keys (``model.``); detected
        when every key carries one the architecture lacks.
    model_type : str, optional
        The recorded model's class (a dump's ``modules[""].type``): picks a registered
        builder for a plain state_dict when ``arch`` is not given.
    input_shape : sequence of int, optional
        The input shape (batch excluded) to trace a forward that branches on shapes at,
        when the file records none; a shape the file records (the one :func:`prune`
        traced at, which its plan was made on) is used instead, as its ``ignore`` is.

    Returns
    -------
    nn.Module
        With its :class:`Provenance` (``provenance(model).notes`` lists what was
        inferred), so :func:`prune` and :func:`save` compose rounds. Its
        ``load_state_dict`` also accepts a whole tdump checkpoint.

    Raises
    ------
    CheckpointError
        Unreadable or foreign files, unregistered architectures named by a file,
        checkpoints that do not match the architecture.

    Examples
    --------
    >>> model = load("pruned.pt")  # doctest: +SKIP
    >>> model = load("finetuned.pt", like="pruned.pt")  # doctest: +SKIP
    >>> model = load("pruned.pt", arch=MyNet)  # your own class, trusted  # doctest: +SKIP
    """
    shown = os.fspath(path)
    sd, info = read_checkpoint(path)
    notes: list[str] = list(info.notes)
    if like is not None and info.kind != "tdump":
        _, base = read_checkpoint(like)
        if base.kind != "tdump":
            raise CheckpointError(
                f"--like {os.fspath(like)} is not a tdump checkpoint; give the checkpoint "
                "`tdump prune` wrote in the previous round"
            )
        if info.arch and arch is None and info.arch != base.arch:
            notes.append(f"the architecture comes from {os.fspath(like)} ({base.arch})")
    else:
        if like is not None:
            notes.append(f"--like {os.fspath(like)} not needed: {shown} is a tdump checkpoint")
        base = info
    if prefix:
        sd = strip_prefix(sd, prefix)
    given = None if arch is None else arch_name(arch)
    from_like = os.fspath(like) if like is not None and base is not info else None
    name, kwargs, trusted = _choose_arch(
        shown, base, sd, given, arch_kwargs, model_type, notes, from_like
    )
    builder = resolve_arch(arch if arch is not None else name, trusted=trusted)
    left_out = skipped_note(module_of(builder), getattr(builder, "__name__", ""))
    if left_out:
        notes.append(left_out)
    model = build_arch(builder, kwargs, trusted=trusted, kwargs_checked=True)
    if not prefix:
        sd, found = auto_prefix(sd, {k: 0 for k in model.state_dict()})
        if found:
            notes.append(f"stripped the prefix {found!r} from the checkpoint's keys")
    inferred = _infer_kwargs(builder, kwargs, sd, notes)
    if inferred:
        kwargs = {**kwargs, **inferred}
        model = build_arch(builder, kwargs, trusted=trusted, kwargs_checked=True)
    ignore = base.ignore or ignore
    shape = tuple(base.input_shape or input_shape or ()) or None
    cumulative = Plan.from_dict({"layers": base.plan}) if base.plan else Plan()
    source = os.fspath(like or path)
    hint = "check --arch and --arch-kwargs"
    if like is not None or base.plan:
        hint = "give the matching previous-round checkpoint with --like"
        hint = f"check --arch, or {hint}" if arch is not None else hint
    if cumulative.layers:  # another architecture's keys: say so before comparing channels
        shown_arch = (
            name if arch is not None or like is None else f"{name} ({source}'s architecture)"
        )
        load_state(model, sd, shown_arch, shown, hint, keys_only=True)
    # shapes come from the state_dict, module by module: no fx trace while loading
    resized = resize_to(model, sd)
    if resized is None:  # a module type without a resize rule: the channel graph instead
        model = build_arch(builder, kwargs, trusted=trusted, kwargs_checked=True)
        _apply_with_graph(model, sd, cumulative, ignore, shape, source, name, notes)
        if not cumulative.layers:
            cumulative = provenance_plan(model)
    else:
        _check_plan_shapes(model, sd, cumulative, shown, source, name, arch is not None)
        if not cumulative.layers and resized:
            cumulative = Plan(layers=resized)
            notes.append(_INFERRED.format(len(resized)))
    match_dtypes(model, sd)  # each tensor as it was saved (a bfloat16 model stays one)
    load_state(model, sd, name, shown, hint)
    refresh_weights(model)
    model.register_load_state_dict_pre_hook(_unwrap_tdump_checkpoint)
    model.__dict__[_ATTR] = Provenance(
        name, dict(kwargs), cumulative, base.rounds, ignore, notes, input_shape=shape
    )
    return model


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    arch: str | Builder | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` as a tdump checkpoint (atomically; see docs/FORMAT.md section 3).

    ``arch``/``arch_kwargs`` default to what :func:`load` recorded; a model built in
    Python needs ``arch`` (a name whose call with ``arch_kwargs`` builds the unpruned
    architecture: a torchvision builder, an import path, or a
    :func:`~tdump.surgery.register_arch` name, which is what lets :func:`load` build
    it again without ``arch=``).

    Examples
    --------
    >>> import numpy as np, torchvision
    >>> from tdump.surgery import prune
    >>> small, _ = prune(torchvision.models.resnet18(), {"conv1": np.arange(64.0)}, count=8)
    >>> save("pruned.pt", small, arch="torchvision.models.resnet18")  # doctest: +SKIP
    """
    if isinstance(path, nn.Module) and isinstance(model, (str, os.PathLike)):
        raise ConfigError(
            "tdump.surgery.save takes (path, model); tdump.save takes (model, path), "
            "as torch.save does: swap the arguments"
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save needs the model (an nn.Module), got a {type(model).__name__}")
    prov = provenance(model)
    name = arch_name(arch) if arch is not None else prov.arch
    if name is None:
        raise ConfigError(
            "save needs arch= (e.g. torchvision.models.resnet18) for a model tdump did not load"
        )
    kwargs = dict(arch_kwargs) if arch_kwargs is not None else prov.arch_kwargs
    layers = prov.plan.to_dict()["layers"]
    write_checkpoint(
        path,
        model,
        name,
        kwargs,
        layers,
        rounds=prov.rounds,
        ignore=prov.ignore,
        input_shape=prov.input_shape,
    )


def dump_model_type(dump: str | os.PathLike[str]) -> str | None:
    """The recorded model's class (``modules[""].type`` of rank 0), or None if not recorded."""
    from tdump.surgery._input_shape import dump_meta

    modules = dump_meta(dump).get("modules")
    root = modules.get("") if isinstance(modules, dict) else None
    kind = root.get("type") if isinstance(root, dict) else None
    return kind if isinstance(kind, str) and kind else None
