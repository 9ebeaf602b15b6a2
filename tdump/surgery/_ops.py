"""Which torch operations keep the channel layout, merge it, or say nothing about channels.

Extend these tables to teach the graph new channel-wise operations; anything not
listed freezes the channels it touches (safe, never wrong).
"""

from __future__ import annotations

import operator

import torch
from torch import nn

__all__ = [
    "ELEMENTWISE",
    "MERGE_OPS",
    "NONTENSOR_METHODS",
    "PASS_FUNCTIONS",
    "PASS_FUNCTION_NAMES",
    "PASS_METHODS",
    "PASS_MODULES",
]

PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout1d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
PASS_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.elu,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid,
    torch.nn.functional.hardtanh,
    torch.nn.functional.dropout,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.interpolate,
}
# fx-wrapped helpers of other libraries, matched by name (torchvision's stochastic depth, timm's drop path)
PASS_FUNCTION_NAMES = {"stochastic_depth", "drop_path"}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
NONTENSOR_METHODS = {"size", "dim", "numel"}
ELEMENTWISE = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    "add",
    "add_",
    "sub",
    "mul",
    "mul_",
    "div",
}
MERGE_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
