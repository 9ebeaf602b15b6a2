"""The per-record arithmetic of the criteria: float64 sums straight from the stored dtype.

A record's tensors are reduced to per-channel float64 vectors without a full-size
float64 copy: float32 activation dot products are summed in float32 over short runs
(their error stays below the inputs' own rounding), everything else is widened a
cache-sized block at a time and summed exactly (``docs/ranking.md``).

Examples
--------
>>> import numpy as np
>>> _per_filter_sum(np.ones((2, 3, 1, 1), np.float32)).tolist()
[3.0, 3.0]
"""

from __future__ import annotations

import numpy as np

__all__: list[str] = []


def _spatial_mean(x: np.ndarray) -> np.ndarray:
    """(batch, channel, *spatial) -> (batch, channel) float64 mean over spatial positions."""
    if x.ndim <= 2:
        return x.astype(np.float64)
    return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=-1, dtype=np.float64)


#: Products are formed per block of this many elements: a float64 block stays in L2 cache.
_BLOCK_ELEMS = 1 << 15

#: float32 x float32 products are summed in float32 over runs of at most this many
#: elements, and the runs' sums in float64.
_F32_RUN = 256


def _dot_sums(a: np.ndarray, b: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """(rows, channel, n) x2 -> (rows, channel) float64 sums over the last axis of ``a * b``.

    Straight from the stored dtype, with no full-size float64 temporary:

    * float32 x float32 (unless ``exact``): ``einsum`` in float32 over runs of
      ``_F32_RUN`` elements, the runs added in float64. The error stays below about
      ``1e-6 * sum |a * b|``, the size of the error the inputs already carry (each
      float32 value is rounded to ``6e-8``), and it is 5-8x faster than widening to
      float64 first: the activation dot products were a third of a `tdump rank`'s
      arithmetic.
    * otherwise (float16, mixed, ``exact``): a cache-sized block at a time is widened
      to float64, multiplied (exact) and summed. float16's einsum runs element by element.
    """
    rows, channels, n = a.shape
    a2 = a.reshape(rows * channels, n)
    b2 = b.reshape(rows * channels, n)
    out = np.zeros(rows * channels, dtype=np.float64)
    if n == 0 or not len(out):
        return out.reshape(rows, channels)
    if not exact and a2.dtype == b2.dtype == np.float32:
        runs, rest = divmod(n, _F32_RUN)
        if runs:  # (row, run, element) views of the same memory: no copy
            whole = (len(out), runs, _F32_RUN)
            a3, b3 = a2[:, : n - rest].reshape(whole), b2[:, : n - rest].reshape(whole)
            np.add.reduce(np.einsum("ijk,ijk->ij", a3, b3), axis=1, dtype=np.float64, out=out)
        if rest:
            out += np.einsum("ij,ij->i", a2[:, n - rest :], b2[:, n - rest :])
        return out.reshape(rows, channels)
    step = max(1, _BLOCK_ELEMS // n)
    tmp = np.empty((min(step, len(out)), n), dtype=np.float64)
    for i in range(0, len(out), step):
        j = min(i + step, len(out))
        prod = tmp[: j - i]
        np.multiply(a2[i:j], b2[i:j], out=prod, dtype=np.float64)
        np.add.reduce(prod, axis=1, out=out[i:j])
    return out.reshape(rows, channels)


def _spatial_dot_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(batch, channel, *spatial) x2 -> (batch, channel): float64 mean over space of ``a * b``.

    >>> a = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    >>> _spatial_dot_mean(a, a).tolist() == (a.astype(np.float64) ** 2).mean(axis=(2, 3)).tolist()
    True
    """
    if a.ndim <= 2:
        return np.multiply(a, b, dtype=np.float64)
    a3 = a.reshape(a.shape[0], a.shape[1], -1)
    return _dot_sums(a3, b.reshape(a3.shape)) / a3.shape[-1]


def _filter_dot(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(out_channel, ...) x2 -> (out_channel,): float64 sum over a filter's weights of ``w * g``.

    Exact: a filter's ``sum(w * g)`` cancels to a small fraction of ``sum |w * g|``, and
    weights are small next to activations.
    """
    w3 = w.reshape(1, w.shape[0], -1)
    return _dot_sums(w3, g.reshape(w3.shape), exact=True)[0]


def _per_filter_sum(x: np.ndarray) -> np.ndarray:
    """(out_channel, ...) -> (out_channel,) float64 sum over the filter's weights."""
    return x.reshape(x.shape[0], -1).sum(axis=1, dtype=np.float64)


def _norm_axes(g: np.ndarray, v: np.ndarray) -> tuple[int, ...]:
    """The axes of ``v`` that weight_norm's norm runs over: where ``g`` has size 1
    (every axis for a 0-d ``g``: ``dim=None``)."""
    return tuple(i for i in range(v.ndim) if g.ndim == 0 or g.shape[i] == 1)


def _weight_normed(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``weight_norm``'s weight ``g * v / ||v||`` in float64, the norm over the axes where
    ``g`` has size 1 (every axis for a 0-d ``g``: ``dim=None``).

    >>> v = np.array([[3.0, 4.0], [0.0, 2.0]])
    >>> _weight_normed(np.array([[10.0], [1.0]]), v).tolist()
    [[6.0, 8.0], [0.0, 1.0]]
    """
    g64, v64 = g.astype(np.float64), v.astype(np.float64)
    axes = _norm_axes(g64, v64)
    return g64 * v64 / np.sqrt((v64 * v64).sum(axis=axes, keepdims=True))


def _weight_normed_taylor(
    g: np.ndarray, v: np.ndarray, g_grad: np.ndarray, v_grad: np.ndarray
) -> np.ndarray:
    """``w * dL/dw`` of a ``weight_norm`` layer, elementwise in float64, from ``g``, ``v``
    and their gradients (``dL/dw`` itself is never stored).

    With ``u = v / ||v||`` per slice, ``dL/dv = (g / ||v||) (dL/dw - (u . dL/dw) u)``
    and ``dL/dg = u . dL/dw``, so ``w * dL/dw = v * dL/dv + g dL/dg u**2``: exact
    for any ``dim`` and with no division by ``g`` (a slice with ``g = 0`` gives 0).

    >>> g, v = np.array([[2.0]]), np.array([[3.0, 4.0]])
    >>> dw = np.array([[1.0, -1.0]])  # dL/dw; torch would store dL/dv and dL/dg
    >>> u = v / 5.0
    >>> dg, dv = (u * dw).sum(keepdims=True), 2.0 / 5.0 * (dw - (u * dw).sum() * u)
    >>> np.allclose(_weight_normed_taylor(g, v, dg, dv), _weight_normed(g, v) * dw)
    True
    """
    g64, v64 = g.astype(np.float64), v.astype(np.float64)
    axes = _norm_axes(g64, v64)
    u2 = v64 * v64 / (v64 * v64).sum(axis=axes, keepdims=True)
    return v64 * v_grad.astype(np.float64) + g64 * g_grad.astype(np.float64) * u2
