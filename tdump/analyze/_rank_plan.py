"""Planning a ranking: the records to read, the layers to score and each layer's job.

:func:`plan_jobs` asks the criterion which stored tensors each layer needs (from the
store's ``modules``/``calls`` dataflow); :mod:`tdump.analyze._rank` runs the jobs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tdump._dataflow import Dataflow
from tdump._format import StoreReader
from tdump._names import MODES, no_mode_steps
from tdump.analyze._args import StepsArg, describe_steps, parse_steps
from tdump.analyze._criteria import Criterion, Plan, PlanContext
from tdump.analyze._diagnose import (
    _NO_ACTIVATION,
    bn_scale_note,
    skipped_notes,
    unscored_reason,
)
from tdump.errors import (
    MissingTensorError,
    SelectionError,
    check_choice,
    compile_regex,
)

#: A module output's gradient or Taylor-term suffix: what is left names the output.
_OUTPUT_SUFFIX = re.compile(r"\.(?:grad|taylor)$")

__all__ = [
    "LayerJob",
    "Record",
    "plan_jobs",
    "read_dataflow",
    "select_layers",
    "select_records",
    "task_args",
]


@dataclass(frozen=True)
class Record:
    """One saved record of one writer rank."""

    rank: int
    index: int
    step: int
    batch_size: int


@dataclass(frozen=True)
class LayerJob:
    """The work for one conv layer: its plan and the records to reduce."""

    layer: str
    plan: Plan
    records: tuple[Record, ...]
    batched: Mapping[str, bool]
    channels: int | None = None  # output channels (None: not recorded), checked per record
    #: Roles whose stored tensors hold the channels on their last axis (a channels-last
    #: Linear's outputs): each task moves it to axis 1 before the criterion reads them.
    last: frozenset[str] = frozenset()
    #: The layer's channels per scored channel: a source after a ``PixelShuffle`` scores
    #: each run of ``unit`` channels as one (its score repeats over the run).
    unit: int = 1


# --------------------------------------------------------------------------- tasks
def task_args(r: Record, keep_nan: bool) -> tuple[int, int, int, int, bool]:
    """The per-record arguments of :func:`_record_task`."""
    return (r.rank, r.index, r.batch_size, r.step, keep_nan)


# --------------------------------------------------------------------------- planning
def read_dataflow(reader: StoreReader, mode: str) -> Dataflow:
    meta = reader.meta(reader.ranks()[0] if reader.ranks() else 0)
    modules = meta.get("modules")
    calls_by_mode = meta.get("calls")
    if not modules or not calls_by_mode:
        raise MissingTensorError(
            f"{reader.path} has no module tree/dataflow (rank attributes 'modules' and 'calls'); "
            "record it with tdump.capture.Hook.register_module(model) or `tdump record`"
        )
    traced = (
        mode if calls_by_mode.get(mode) else next((m for m, v in calls_by_mode.items() if v), "")
    )
    calls = calls_by_mode.get(traced)
    if not calls:
        raise MissingTensorError(f"{reader.path} has an empty 'calls' dataflow for mode {mode!r}")
    returned = (meta.get("model_outputs") or {}).get(traced) or ()
    return Dataflow(modules, calls, frozenset(returned))


def select_records(reader: StoreReader, mode: str, steps: StepsArg) -> list[Record]:
    check_choice(mode, MODES, "mode")  # a misspelt mode is not "no saved steps"
    ranks = reader.ranks()
    if not any(reader.num_records(mode, r) for r in ranks):
        present = {m for r in ranks for m in reader.modes(r)}
        raise MissingTensorError(no_mode_steps(reader.path, mode, present))
    mask = parse_steps(steps)
    out: list[Record] = []
    all_steps: list[int] = []
    for r in ranks:
        rec = reader.records(mode, r)
        all_steps.extend(rec["step"].tolist())
        for i in np.flatnonzero(mask(rec["step"])):
            out.append(Record(r, int(i), int(rec["step"][i]), int(rec["batch_size"][i])))
    if not out:
        raise SelectionError(
            f"no saved {mode!r} steps in {describe_steps(steps)}; the dump has {len(all_steps)} "
            f"saved {mode!r} steps from {min(all_steps)} to {max(all_steps)}"
        )
    return out


def select_layers(flow: Dataflow, layers: str | None) -> list[str]:
    found = flow.layers()
    if layers is None:
        return found
    rx = compile_regex(layers, "layers / --layers regex")
    assert rx is not None
    picked = [c for c in found if rx.search(c)]
    if not picked:
        raise SelectionError(
            f"layers / --layers {layers!r} matches no conv or hidden Linear layer; they are "
            f"e.g. {', '.join(found[:4])}"
        )
    return picked


def plan_jobs(
    reader: StoreReader,
    crit: Criterion,
    mode: str,
    layers: list[str],
    records: list[Record],
    explicit_layers: bool,
    notes: list[str],
    skipped: dict[str, str],
) -> list[LayerJob]:
    """One job per layer the criterion can score; the others go to ``skipped`` (with why)
    and ``notes`` (one line per reason, with what to record to score them)."""
    rank0 = records[0].rank
    names = frozenset(reader.tensor_names(mode, rank0))
    attrs_cache: dict[str, Mapping[str, Any]] = {}

    def attrs(name: str) -> Mapping[str, Any]:
        if name not in attrs_cache:
            attrs_cache[name] = reader.tensor_attrs(mode, name, rank0)
        return attrs_cache[name]

    def list_train() -> frozenset[str]:  # only a failed plan's hint needs it
        return frozenset(reader.tensor_names("train", rank0))

    ctx = PlanContext(
        read_dataflow(reader, mode), names, mode, attrs, list_train if mode != "train" else None
    )
    planned: list[tuple[str, Plan]] = []
    unplanned: list[str] = []
    for layer in layers:
        # a conv whose channels are the model's outputs is never pruned: unless asked
        # for by name, it gets no rows (a note says why), whatever the criterion
        output = not explicit_layers and ctx.dataflow.is_model_output(layer)
        plan = None if output else crit.plan(layer, ctx)
        if plan is not None:
            planned.append((layer, plan))
        else:
            unplanned.append(layer)
    config = (reader.meta(rank0).get("config") or {}) if unplanned else {}
    scored = {layer for layer, _ in planned}
    partners = {
        layer: [p for p in ctx.dataflow.summed_with(layer) if p in scored] for layer in unplanned
    }
    reasons = {
        layer: unscored_reason(crit, ctx, layer, config, partners=partners[layer])
        for layer in unplanned
    }
    recorded, by_type = config.get("include_regex"), bool(config.get("include_activations"))
    linears = frozenset(layer for layer in unplanned if ctx.dataflow.is_linear(layer))
    if not planned:
        whys = {why for why, _ in reasons.values()}
        if explicit_layers or whys == {_NO_ACTIVATION}:
            # crit.missing() would hint at activations the model does not have as modules
            raise MissingTensorError(
                skipped_notes(crit, reasons, recorded, by_type=by_type, linears=linears)[0]
            )
        raise MissingTensorError(crit.missing(ctx))
    notes.extend(
        skipped_notes(crit, reasons, recorded, by_type=by_type, linears=linears, partners=partners)
    )
    skipped.update({layer: why for layer, (why, _) in reasons.items()})
    bn_note = bn_scale_note(crit, ctx.dataflow, [layer for layer, _ in planned])
    if bn_note is not None:
        notes.append(bn_note)

    saved: dict[tuple[int, str], set[int]] = {}
    jobs: list[LayerJob] = []
    for layer, plan in planned:
        use: list[Record] = []
        for rec in records:
            ok = True
            for name in plan.sources.values():
                key = (rec.rank, name)
                if key not in saved:
                    saved[key] = set(reader.saved_records(mode, name, rec.rank).tolist())
                ok = ok and rec.index in saved[key]
            if ok:
                use.append(rec)
        if not use:
            raise SelectionError(
                f"layer {layer!r}: no selected {mode!r} step holds {', '.join(plan.sources.values())}"
            )
        if not crit.all_records:
            use = [max(use, key=lambda r: (r.step, r.rank))]
        batched = {
            role: bool(attrs(name).get("dims")) and attrs(name)["dims"][0] == "batch"
            for role, name in plan.sources.items()
        }
        last = _channels_last_roles(ctx.dataflow, layer, plan, attrs)
        channels = ctx.dataflow.out_channels(layer)
        unit = max(
            ctx.dataflow.channel_factor(_OUTPUT_SUFFIX.sub("", name))
            for name in plan.sources.values()
        )
        if channels is not None:
            channels //= unit
        jobs.append(LayerJob(layer, plan, tuple(use), batched, channels, last, unit))
    return jobs


def _channels_last_roles(
    flow: Dataflow, layer: str, plan: Plan, attrs: Callable[[str], Mapping[str, Any]]
) -> frozenset[str]:
    """The roles of ``plan`` whose full tensors hold ``layer``'s channels on their last axis.

    Only a channels-last Linear's module outputs (and their gradients) have any; its
    weights are ``(out, in)`` as usual. A stored reduction of such an output must have
    been taken over the tokens (``channel_axis`` -1), not over the features.
    """
    if not flow.channels_last(layer):
        return frozenset()
    last = set()
    for role, name in plan.sources.items():
        a = attrs(name)
        if a.get("kind") not in ("output", "output_grad", "output_taylor"):
            continue
        if not a.get("reduction"):
            last.add(role)
        elif a.get("channel_axis") != -1:
            raise MissingTensorError(
                f"{name!r} of channels-last Linear {layer!r} was stored reduced over its "
                "features, not its tokens (an earlier tdump's reduction); record it again "
                "with this one, or rank the other layers (--layers)"
            )
    return frozenset(last)
