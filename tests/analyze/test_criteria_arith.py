"""The criteria's dot products: float64-exact from float32 and float16, any shape (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

from tdump.analyze._criteria import _filter_dot, _spatial_dot_mean


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
    # exact products (float32 x float32 fits float64), float64 sums: only summation order differs
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-300)


def test_signed_sums_that_cancel_keep_their_precision() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    g = a.copy()
    g[..., 1::2] *= -1  # sum of a*g cancels to about 1e-4 of sum |a*g|
    ref = (a.astype(np.float64) * g).reshape(2, 3, -1).mean(axis=-1)
    np.testing.assert_allclose(_spatial_dot_mean(a, g), ref, rtol=1e-9)


def test_filter_dot_matches_float64() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    g = rng.standard_normal((8, 4, 3, 3)).astype(np.float16)
    ref = (w.astype(np.float64) * g.astype(np.float64)).reshape(8, -1).sum(axis=1)
    np.testing.assert_allclose(_filter_dot(w, g), ref, rtol=1e-12)
