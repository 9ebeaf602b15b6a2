"""Parameter and FLOP counts, per layer and in total.

FLOPs are counted the way torchvision reports them: multiply-accumulates of conv and
linear layers (``weight.numel()`` times output positions). One forward pass on the
unpruned model records output positions; pruning never changes them, so the same
positions give the pruned model's FLOPs without running it.

Examples
--------
>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 2))
>>> pos = output_positions(m, (3, 4, 4))
>>> layer_flops(m, pos)
{'0': 3456, '2': 256}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdump.errors import ConfigError, first_line

if TYPE_CHECKING:
    from tdump.surgery._plan import Plan

__all__ = [
    "InputChannelsError",
    "clause_line",
    "count_params",
    "layer_flops",
    "layer_params",
    "output_positions",
    "prune_summary",
]


class InputChannelsError(ConfigError):
    """The conv that reads the model's input wants another channel count than it has.

    Attributes ``layer``, ``expected`` and ``got`` say which conv and how many
    channels; the message says it in words (torch's own message names neither the
    layer nor, cut short, the count it got).
    """

    def __init__(self, layer: str, expected: int, got: int) -> None:
        self.layer, self.expected, self.got = layer, expected, got
        super().__init__(
            f"the model's first conv{f' ({layer})' if layer else ''} expects {expected} "
            f"input channels, the input has {got}"
        )


_COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


def count_params(model: nn.Module) -> int:
    """Number of parameters (not buffers)."""
    return sum(p.numel() for p in model.parameters())


def layer_params(model: nn.Module) -> dict[str, int]:
    """Parameters of each conv and linear module (weight + bias)."""
    return {
        n: sum(p.numel() for p in m.parameters(recurse=False))
        + sum(p.numel() for p in getattr(m, "parametrizations", nn.ModuleDict()).parameters())
        for n, m in model.named_modules()
        if isinstance(m, _COUNTED)
    }


@torch.no_grad()
def output_positions(
    model: nn.Module,
    input_shape: Sequence[int],
    more: Sequence[tuple[Sequence[int], str]] = (),
) -> dict[str, int]:
    """Output positions (product of non-channel, non-batch dims) of each conv/linear call.

    A transposed conv counts its *input* positions (each multiplies the whole weight).
    ``input_shape`` excludes the batch dimension. A module called several times sums.
    ``more`` gives a ``forward(x, t, ...)``'s other arguments as ``(shape, dtype)``
    (batch included, 1): they are passed as zeros.

    Raises
    ------
    InputChannelsError
        A conv reads the input unchanged (same shape) and wants other channels.

    Examples
    --------
    >>> output_positions(torch.nn.Conv2d(1, 4, 3), (3, 8, 8))
    Traceback (most recent call last):
    ...
    tdump.surgery._stats.InputChannelsError: the model's first conv expects 1 input channels, the input has 3
    """
    pos: dict[str, int] = {}
    handles = []
    shape = (1, *input_shape)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):

            def check(m: nn.Module, args: tuple[object, ...], name: str = name) -> None:
                x = args[0] if args else None
                # only a conv fed the input as it came: a model that makes its own
                # channels first (grayscale -> RGB) fails later, in torch's words
                wanted = int(getattr(m, "in_channels", 0))
                fed_input = isinstance(x, torch.Tensor) and tuple(x.shape) == shape
                if fed_input and shape[1] != wanted:
                    raise InputChannelsError(name, wanted, shape[1])

            handles.append(mod.register_forward_pre_hook(check))
        if isinstance(mod, _COUNTED):

            def hook(m: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                if isinstance(m, nn.modules.conv._ConvTransposeNd):
                    out = args[0]  # each weight multiplies every *input* position once
                n = (
                    out.numel()
                    // out.shape[0]
                    // (out.shape[1] if isinstance(m, nn.modules.conv._ConvNd) else out.shape[-1])
                )
                pos[name] = pos.get(name, 0) + n

            handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, dtype=p.dtype if p is not None else torch.float32)
        model(x, *(_zeros(shape, dtype, x.dtype) for shape, dtype in more))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return pos


def _zeros(shape: Sequence[int], dtype: str, floating: torch.dtype) -> torch.Tensor:
    """Zeros of a recorded input: integer dtypes as recorded, floating ones as the model's."""
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype):
        kind = floating
    return torch.zeros(*shape, dtype=floating if kind.is_floating_point else kind)


def layer_flops(model: nn.Module, positions: dict[str, int]) -> dict[str, int]:
    """Multiply-accumulates per conv/linear module, from :func:`output_positions`."""
    mods = dict(model.named_modules())
    return {n: int(mods[n].weight.numel()) * p for n, p in positions.items() if n in mods}


def clause_line(exc: BaseException, limit: int = 240) -> str:
    """``exc``'s first line, cut at a sentence or clause boundary when it is long."""
    text = first_line(exc, None)
    if len(text) <= limit:
        return text
    cut = max(text.rfind(sep, 0, limit) for sep in (". ", "; ", ", "))
    return text[:cut] if cut > 0 else text[:limit] + "..."


def prune_summary(
    before: nn.Module,
    after: nn.Module,
    plan: Plan,
    input_shape: tuple[int, ...] | None,
    shape_source: str = "--input-shape",
    more: Sequence[tuple[Sequence[int], str]] = (),
) -> dict[str, Any]:
    """Per layer and total channels, parameters and FLOPs before/after (a JSON-able dict).

    FLOPs need one forward pass of ``before`` at ``input_shape`` (batch excluded); if
    it fails, FLOPs are reported as ``None`` with a note naming ``shape_source`` (where
    the shape came from: ``--input-shape``, the dump, the fallback), and, for a channel
    count the model does not take, the ``--input-shape`` that fits. ``more``: the other
    arguments of a ``forward(x, t, ...)`` (:func:`output_positions`).
    """
    notes = list(plan.notes)
    try:
        positions = output_positions(before, input_shape, more) if input_shape else None
    except InputChannelsError as exc:
        positions = None
        fixed = ",".join(map(str, (exc.expected, *(input_shape or ())[1:])))
        where = f" ({exc.layer})" if exc.layer else ""
        notes.append(
            f"FLOPs not computed: the model's first conv{where} expects {exc.expected} input "
            f"channels, {shape_source} gives {exc.got}; pass --input-shape {fixed}"
        )
    except Exception as exc:  # any model error: the summary still prints, without FLOPs
        positions = None
        notes.append(
            f"FLOPs not computed: forward at input shape {'x'.join(map(str, input_shape or ()))} "
            f"({shape_source}) failed: {clause_line(exc)}"
        )
    p0, p1 = layer_params(before), layer_params(after)
    filters0 = _filters(before)
    f0 = layer_flops(before, positions) if positions else {}
    f1 = layer_flops(after, positions) if positions else {}
    mods0, mods1 = dict(before.named_modules()), dict(after.named_modules())
    rows = []
    for name, n0 in p0.items():
        if p1.get(name) == n0 and name not in plan.layers:
            continue
        m0, m1 = mods0[name], mods1[name]
        # a Linear whose outputs the plan prunes (an MLP's hidden layer) shows them, as a conv
        attr = (
            "out_channels"
            if hasattr(m0, "out_channels")
            else "out_features"
            if name in plan.layers
            else "in_features"
        )
        rows.append(
            {
                "layer": name,
                "channels_before": int(getattr(m0, attr)),
                "channels_after": int(getattr(m1, attr)),
                "params_before": n0,
                "params_after": p1.get(name, 0),
                "flops_before": f0.get(name),
                "flops_after": f1.get(name),
            }
        )
    # the Linears whose outputs the plan prunes (hidden layers of an MLP head)
    linears = [n for n in plan.layers if isinstance(mods0.get(n), nn.Linear)]
    return {
        "removed_channels": plan.removed,
        "removed_filters": filters0 - _filters(after),  # depthwise convs that follow included
        "filters_before": filters0,
        "filters_after": _filters(after),
        "linear_layers": len(linears),
        "linear_features_before": sum(int(mods0[n].out_features) for n in linears),
        "linear_features_after": sum(
            int(getattr(mods1.get(n), "out_features", 0)) for n in linears
        ),
        "params_before": count_params(before),
        "params_after": count_params(after),
        "flops_before": sum(f0.values()) if positions else None,
        "flops_after": sum(f1.values()) if positions else None,
        "input_shape": list(input_shape) if input_shape else None,
        "more_inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in more],
        "layers": rows,
        "notes": notes,
    }


def _filters(model: nn.Module) -> int:
    return sum(
        int(m.out_channels) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
    )
