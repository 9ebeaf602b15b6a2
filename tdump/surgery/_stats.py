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

import torch
from torch import nn

__all__ = ["count_params", "layer_flops", "layer_params", "output_positions"]

_COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


def count_params(model: nn.Module) -> int:
    """Number of parameters (not buffers)."""
    return sum(p.numel() for p in model.parameters())


def layer_params(model: nn.Module) -> dict[str, int]:
    """Parameters of each conv and linear module (weight + bias)."""
    return {
        n: sum(p.numel() for p in m.parameters(recurse=False))
        for n, m in model.named_modules()
        if isinstance(m, _COUNTED)
    }


@torch.no_grad()
def output_positions(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Output positions (product of non-channel, non-batch dims) of each conv/linear call.

    ``input_shape`` excludes the batch dimension. A module called several times sums.
    """
    pos: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, _COUNTED):

            def hook(m: nn.Module, args: object, out: torch.Tensor, name: str = name) -> None:
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
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return pos


def layer_flops(model: nn.Module, positions: dict[str, int]) -> dict[str, int]:
    """Multiply-accumulates per conv/linear module, from :func:`output_positions`."""
    mods = dict(model.named_modules())
    return {n: int(mods[n].weight.numel()) * p for n, p in positions.items() if n in mods}
