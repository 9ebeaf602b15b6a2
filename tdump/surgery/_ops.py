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
    nn.Hardtanh,  # ReLU6 too
    nn.Softplus,
    nn.LogSigmoid,
    nn.CELU,
    nn.RReLU,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout1d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
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
_F = torch.nn.functional
PASS_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    # element-wise activations (and their in-place forms)
    _F.relu,
    _F.relu_,
    _F.relu6,
    _F.leaky_relu,
    _F.leaky_relu_,
    _F.elu,
    _F.elu_,
    _F.selu,
    _F.selu_,
    _F.celu,
    _F.celu_,
    _F.gelu,
    _F.silu,
    _F.mish,
    _F.hardswish,
    _F.hardsigmoid,
    _F.hardtanh,
    _F.hardtanh_,
    _F.softplus,
    _F.softsign,
    _F.logsigmoid,
    _F.tanhshrink,
    _F.threshold,
    _F.hardshrink,
    _F.softshrink,
    _F.rrelu,
    _F.rrelu_,
    _F.sigmoid,
    _F.tanh,
    # dropout (whole channels at most), pooling over the dims after the channels
    _F.dropout,
    _F.dropout1d,
    _F.dropout2d,
    _F.dropout3d,
    _F.alpha_dropout,
    _F.feature_alpha_dropout,
    _F.max_pool1d,
    _F.max_pool2d,
    _F.max_pool3d,
    _F.avg_pool1d,
    _F.avg_pool2d,
    _F.avg_pool3d,
    _F.adaptive_avg_pool1d,
    _F.adaptive_avg_pool2d,
    _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d,
    _F.adaptive_max_pool2d,
    _F.adaptive_max_pool3d,
    _F.interpolate,
}
# fx-wrapped helpers of other libraries, matched by name (torchvision's stochastic depth, timm's drop path)
PASS_FUNCTION_NAMES = {"stochastic_depth", "drop_path"}
PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach",
    "float",
}  # fmt: skip
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
