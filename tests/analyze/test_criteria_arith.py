"""The criteria's dot products against numpy in float64, any shape (issue 12).

float16 (and mixed) inputs are summed exactly in float64; float32 x float32 in float32
runs, within ``1e-6 * sum |a * g|`` of the float64 result.
"""

from __future__ import annotations

import numpy as np
import pytest

from tdump.analyze._arith import (
    _filter_dot,
    _spatial_dot_mean,
    _weight_normed,
    _weight_normed_taylor,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 600, 3, 3), (4, 2, 181, 181), (3, 4)])
def test_spatial_dot_mean_matches_float64(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    a = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    g = (rng.standard_normal(shape) * 1e-3).astype(dtype)
    got = _spatial_dot_mean(a, g)
    assert got.dtype == np.float64 and got.shape == shape[:2]
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    prod = a64 * g64
    ref = prod.reshape(shape[0], shape[1], -1).mean(axis=-1) if len(shape) > 2 else prod
    if dtype is np.float16 or len(shape) == 2:
        # exact products (float16 x float16 fits float64), float64 sums: only the order differs
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-300)
    else:
        scale = np.abs(prod).reshape(shape[0], shape[1], -1).mean(axis=-1)
        assert (np.abs(got - ref) <= 1e-6 * scale).all()


def test_signed_sums_that_cancel_stay_within_the_inputs_rounding() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    g = a.copy()
    g[..., 1::2] *= -1  # sum of a*g cancels to about 1e-2 of sum |a*g|
    prod = a.astype(np.float64) * g
    ref = prod.reshape(2, 3, -1).mean(axis=-1)
    scale = np.abs(prod).reshape(2, 3, -1).mean(axis=-1)
    assert (np.abs(ref) < 0.05 * scale).all()  # the case this test is about
    # float32 rounding of the inputs alone moves the exact sum by up to ~6e-8 * scale
    assert (np.abs(_spatial_dot_mean(a, g) - ref) <= 1e-6 * scale).all()


@pytest.mark.parametrize("grad_dtype", [np.float16, np.float32])
def test_filter_dot_matches_float64(grad_dtype: type) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64, 3, 3)).astype(np.float32)
    g = rng.standard_normal((8, 64, 3, 3)).astype(grad_dtype)  # signed: the sums cancel
    ref = (w.astype(np.float64) * g.astype(np.float64)).reshape(8, -1).sum(axis=1)
    np.testing.assert_allclose(_filter_dot(w, g), ref, rtol=1e-12)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_normed_matches_torch(dim: int | None) -> None:
    """l1 of a weight_norm layer rebuilds w from the recorded g and v, as torch does."""
    import torch
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    conv = weight_norm(torch.nn.Conv2d(3, 5, 3), dim=dim)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(-2.0)  # g far from ||v||, negative
    g = conv.parametrizations.weight.original0.detach().numpy()
    v = conv.parametrizations.weight.original1.detach().numpy()
    want = conv.weight.detach().double().numpy()
    assert np.allclose(_weight_normed(g, v), want, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("old_hook", [False, True])
def test_weight_normed_taylor_matches_torch(dim: int | None, old_hook: bool) -> None:
    """taylor-weight of a weight_norm layer: ``w * dL/dw`` rebuilt from g, v and their
    gradients equals torch's own ``w * dL/dw`` (the weight's gradient, never stored)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import weight_norm as old_weight_norm
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    if old_hook:
        conv = old_weight_norm(torch.nn.Conv2d(3, 5, 3), dim=-1 if dim is None else dim)
        g, v = conv.weight_g, conv.weight_v
    else:
        conv = weight_norm(torch.nn.Conv2d(3, 5, 3), dim=dim)
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    with torch.no_grad():
        g.mul_(-2.0)  # g far from ||v||, negative
    # the weight as each spelling computes it: the old hook at a forward, parametrize at a read
    w = torch._weight_norm(v, g, -1 if dim is None else dim) if old_hook else conv.weight
    w.retain_grad()
    F.conv2d(torch.randn(2, 3, 6, 6), w, conv.bias).sin().sum().backward()
    assert g.grad is not None and v.grad is not None and w.grad is not None
    got = _weight_normed_taylor(
        g.detach().numpy(), v.detach().numpy(), g.grad.numpy(), v.grad.numpy()
    )
    want = (w.detach().double() * w.grad.double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * np.abs(want).max())
