"""Module classes by role, from their qualified type names (no torch import).

Capture selects activation modules by type (``HookConfig.include_activations``) and
the analyzers follow channels through the module tree a store records; both name a
class as ``module.qualname`` (``torch.nn.modules.activation.ReLU``) and match only its
last part, so subclasses defined elsewhere under the same name count too.

Examples
--------
>>> is_activation_type("torch.nn.modules.activation.ReLU6"), is_conv_type("torch.nn.Linear")
(True, False)
>>> type_name(int)
'builtins.int'
"""

from __future__ import annotations

import re

__all__ = [
    "WEIGHT_NORM_PARAMS",
    "is_activation_type",
    "is_bn_type",
    "is_channel_preserving",
    "is_conv_type",
    "is_elementwise_type",
    "is_linear_type",
    "is_mean_cancelling_norm_type",
    "is_norm_type",
    "is_pixel_shuffle_type",
    "is_transposed_conv_type",
    "layer_base",
    "type_name",
]

#: The ``(g, v)`` parameter names under a layer whose weight is ``weight_norm(g, v)``:
#: ``torch.nn.utils.parametrizations.weight_norm``'s, then the older hook's.
WEIGHT_NORM_PARAMS = (
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ("weight_g", "weight_v"),
)

_CONV = re.compile(r"(^|\.)(Conv[123]d|LazyConv[123]d)$")
_CONV_T = re.compile(r"(^|\.)(ConvTranspose[123]d|LazyConvTranspose[123]d)$")
_LINEAR = re.compile(r"(^|\.)(Linear|LazyLinear)$")
_BN = re.compile(r"(^|\.)(BatchNorm[123]d|SyncBatchNorm|LazyBatchNorm[123]d)$")
_INSTANCE_NORM = re.compile(r"(^|\.)(Lazy)?InstanceNorm[123]d$")
_GROUP_NORM = re.compile(r"(^|\.)GroupNorm$")
_ACT = re.compile(
    r"(^|\.)(ReLU|ReLU6|LeakyReLU|PReLU|RReLU|ELU|SELU|CELU|GELU|SiLU|Mish|Sigmoid|Tanh|"
    r"Hardswish|Hardsigmoid|Hardtanh|Softplus|Softsign|LogSigmoid|Tanhshrink|Threshold|"
    r"Hardshrink|Softshrink)$"
)
_ELEMENTWISE = re.compile(
    r"(^|\.)(Identity|Dropout|Dropout[123]d|AlphaDropout|FeatureAlphaDropout)$"
)
_POOL = re.compile(
    r"(^|\.)(MaxPool[123]d|AvgPool[123]d|AdaptiveMaxPool[123]d|AdaptiveAvgPool[123]d|LPPool[12]d)$"
)


#: Modules of torch's single-operation layers (not ``Module``, containers, transformers).
_TORCH_LAYER_MODULE = re.compile(
    r"^torch\.nn\.modules\.(conv|linear|batchnorm|normalization|instancenorm|activation|"
    r"dropout|pooling|pixelshuffle|flatten|padding|sparse)$"
)
#: What a layer computes with: a subclass that defines neither computes as its base does.
_FORWARDS = ("forward", "_conv_forward")


def layer_base(cls: type) -> type | None:
    """The torch layer class ``cls`` is, or subclasses without changing what it computes.

    A subclass that only adds a constructor or helpers (torchvision's video
    ``Conv3DSimple(nn.Conv3d)``, ``weight_norm``'s ``ParametrizedConv2d``) computes as its
    torch base; one that defines ``forward`` (a weight-standardized conv) does not:
    ``None``, as for containers and other modules.

    >>> class Conv3DSimple(int): pass  # stand-in: no torch import here
    >>> layer_base(Conv3DSimple) is None
    True
    """
    for base in cls.__mro__:
        if _TORCH_LAYER_MODULE.match(base.__module__):
            same = all(getattr(cls, f, None) is getattr(base, f, None) for f in _FORWARDS)
            return base if same else None
    return None


def type_name(cls: type) -> str:
    """``module.qualname`` of ``cls``: how the store's module tree names a module's type.

    A subclass of a torch layer that computes as it (:func:`layer_base`: a class made
    for a parametrized tensor, ``ParametrizedConv2d``, or a constructor-only subclass
    such as torchvision's ``Conv3DSimple``) is named as that layer.
    """
    cls = layer_base(cls) or cls
    return f"{cls.__module__}.{cls.__qualname__}"


def is_conv_type(type_name: str) -> bool:
    """True for (non-transposed) convolution classes, e.g. ``torch.nn.modules.conv.Conv2d``."""
    return bool(_CONV.search(type_name))


def is_transposed_conv_type(type_name: str) -> bool:
    """True for transposed convolution classes (weight ``(in, out / groups, *kernel)``)."""
    return bool(_CONV_T.search(type_name))


def is_linear_type(type_name: str) -> bool:
    """True for fully connected classes, e.g. ``torch.nn.modules.linear.Linear``."""
    return bool(_LINEAR.search(type_name))


def is_bn_type(type_name: str) -> bool:
    """True for BatchNorm classes."""
    return bool(_BN.search(type_name))


def is_mean_cancelling_norm_type(type_name: str) -> bool:
    """True for norms that subtract a per-channel mean (BatchNorm, InstanceNorm).

    A constant per-channel bias before one of them is cancelled (its gradient is ~0).
    """
    return is_bn_type(type_name) or bool(_INSTANCE_NORM.search(type_name))


def is_norm_type(type_name: str) -> bool:
    """True for norms over the channels at dim 1 (BatchNorm, InstanceNorm, GroupNorm).

    >>> is_norm_type("torch.nn.GroupNorm"), is_norm_type("torch.nn.LayerNorm")
    (True, False)
    """
    return is_mean_cancelling_norm_type(type_name) or bool(_GROUP_NORM.search(type_name))


def is_activation_type(type_name: str) -> bool:
    """True for element-wise activation classes (ReLU and friends).

    >>> is_activation_type("torch.nn.PReLU"), is_activation_type("torch.nn.Softshrink")
    (True, True)
    """
    return bool(_ACT.search(type_name))


def is_elementwise_type(type_name: str) -> bool:
    """True for modules whose every output element reads only the same input element.

    Activations, dropout and ``Identity``: the modules that keep the features of a
    channels-last tensor (a Linear's ``(batch, tokens, features)``) one to one.
    BatchNorm and pooling work along dim 1 and the dims after it, so they do not.

    >>> is_elementwise_type("torch.nn.GELU"), is_elementwise_type("torch.nn.BatchNorm1d")
    (True, False)
    """
    return is_activation_type(type_name) or bool(_ELEMENTWISE.search(type_name))


def is_pixel_shuffle_type(type_name: str) -> bool:
    """True for ``PixelShuffle``: each run of ``upscale_factor ** 2`` channels becomes one."""
    return type_name.endswith(".PixelShuffle")


def is_channel_preserving(type_name: str) -> bool:
    """True for modules that keep channels one to one (norms, activations, dropout, pooling)."""
    return (
        is_norm_type(type_name) or is_elementwise_type(type_name) or bool(_POOL.search(type_name))
    )
