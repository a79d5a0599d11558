"""Upsampling (resizing) of channels-last feature maps with PyTorch's ``nn.Upsample`` /
``F.interpolate`` conventions, as used by FCN heads and detection necks (FPN).

Input ``(N, *spatial, C)`` (1, 2 or 3 spatial axes); output ``(N, *out_spatial, C)``. Each
spatial axis is resized independently, by an output ``size`` or a ``scale_factor`` (output
``floor(size * scale_factor)``). For output index ``j`` along an axis of input length ``n`` and
output length ``m``, with ``s = 1 / scale_factor`` when a scale factor is given (PyTorch's
default, ``recompute_scale_factor=None``) and ``s = n / m`` when a size is given:

- ``"nearest"`` (PyTorch's legacy default): source ``min(floor(j * s), n - 1)``, computed in
  float32 as PyTorch does; doubling picks ``j // 2``.
- ``"nearest-exact"``: source ``min(floor((j + 0.5) * s), n - 1)`` (pixel centres; what
  PIL/OpenCV nearest resizing does).
- ``"linear"`` / ``"bilinear"`` / ``"trilinear"`` (linear along every spatial axis; the last two
  check that there are 2 / 3 spatial axes):

  - ``align_corners=False`` (default, PyTorch's): pixel centres are aligned;
    source ``x = max((j + 0.5) * s - 0.5, 0)``; the corner pixels' *edges* line up.
  - ``align_corners=True``: the corner pixels' *centres* line up, source
    ``x = j * (n - 1) / (m - 1)`` (``scale_factor`` is then used only for the output size).

  ``y = (1 - t) * in[floor(x)] + t * in[min(floor(x) + 1, n - 1)]`` with ``t = x - floor(x)``.

The resize is a gather of precomputed indices (and a weighted sum for linear modes), so the
gradient is exact and cheap (a scatter-add). No params, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from fdl.nn.core import Layer, ShapeError

__all__ = ["upsample", "resize_axis_indices"]

_METHODS = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear")
_LINEAR_RANK = {"bilinear": 2, "trilinear": 3}


def _per_axis(name: str, value, nsp: int, kind):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * nsp
    if isinstance(value, Sequence) and len(value) == nsp:
        return tuple(value)
    raise ShapeError("upsample", f"{name} {value!r} does not fit {nsp} spatial axes")


def resize_axis_indices(n: int, m: int, method: str, align_corners: bool,
                        scale_factor: float | None):
    """For an axis of input length ``n`` resized to ``m``: ``(i0, i1, t)`` numpy arrays of
    length ``m`` (``t`` None for nearest modes: ``out[j] = in[i0[j]]``; otherwise
    ``out[j] = (1 - t[j]) * in[i0[j]] + t[j] * in[i1[j]]``)."""
    j = np.arange(m)
    if method in ("nearest", "nearest-exact"):
        s = np.float32(1.0 / scale_factor) if scale_factor else np.float32(n) / np.float32(m)
        if method == "nearest":
            if m == n:
                return j, None, None
            if m == 2 * n:
                return j >> 1, None, None
            src = np.floor(j.astype(np.float32) * s)
        else:
            src = np.floor((j.astype(np.float32) + np.float32(0.5)) * s)
        return np.minimum(src.astype(np.int64), n - 1), None, None
    if align_corners:
        x = j * ((n - 1) / (m - 1)) if m > 1 else np.zeros(m)
    else:
        s = 1.0 / scale_factor if scale_factor else n / m
        x = np.maximum((j + 0.5) * s - 0.5, 0.0)
    i0 = np.floor(x).astype(np.int64)
    i0 = np.minimum(i0, n - 1)
    i1 = np.where(i0 < n - 1, i0 + 1, i0)
    t = np.clip(x - i0, 0.0, 1.0)
    return i0, i1, t


def upsample(
    scale_factor: float | Sequence[float] | None = None,
    *,
    size: int | Sequence[int] | None = None,
    method: str = "nearest",
    align_corners: bool | None = None,
) -> Layer:
    """Resize ``(N, *spatial, C)`` by ``scale_factor`` or to ``size`` (exactly one of them).

    ``method``: ``"nearest"`` (default, as PyTorch), ``"nearest-exact"``, ``"linear"``,
    ``"bilinear"``, ``"trilinear"``; ``align_corners`` (linear modes only, default False) as
    PyTorch. Conventions in the module docstring; values equal PyTorch's ``F.interpolate``.
    """
    if method not in _METHODS:
        raise ValueError(f"upsample: method must be one of {_METHODS}, got {method!r}")
    if (scale_factor is None) == (size is None):
        raise ValueError("upsample: give exactly one of scale_factor and size")
    linear = method not in ("nearest", "nearest-exact")
    if align_corners is not None and not linear:
        raise ValueError(f"upsample: align_corners is only for linear modes, not {method!r}")
    align = bool(align_corners)
    for v in np.atleast_1d(np.asarray(scale_factor if size is None else size, dtype=object)):
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
            or not math.isfinite(v)
        if bad or (size is not None and not isinstance(v, int)):
            what = "scale_factor entries must be finite numbers > 0" if size is None \
                else "size entries must be integers >= 1"
            raise ValueError(f"upsample: {what}, got {scale_factor if size is None else size!r}")

    def plan(shape):
        shape = tuple(shape)
        nsp = len(shape) - 2
        if nsp < 1 or nsp > 3:
            raise ShapeError("upsample", f"expected input (N, *spatial, C) with 1-3 spatial axes, "
                                         f"got shape {shape}")
        if method in _LINEAR_RANK and nsp != _LINEAR_RANK[method]:
            raise ShapeError("upsample", f"method {method!r} needs {_LINEAR_RANK[method]} "
                                         f"spatial axes, got input shape {shape}")
        if size is not None:
            outs, sfs = _per_axis("size", size, nsp, int), (None,) * nsp
        else:
            sfs = tuple(float(f) for f in _per_axis("scale_factor", scale_factor, nsp, float))
            outs = tuple(int(math.floor(n * f)) for n, f in zip(shape[1:-1], sfs, strict=True))
        if any(o < 1 for o in outs) or any(n < 1 for n in shape[1:-1]):
            raise ShapeError("upsample", f"output spatial size {outs} from input {shape} is empty")
        return outs, sfs

    def init(key, in_shape):
        outs, _ = plan(in_shape)
        return (in_shape[0], *outs, in_shape[-1]), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        outs, sfs = plan(jnp.shape(x))
        y = x
        for ax, (n, m, sf) in enumerate(zip(x.shape[1:-1], outs, sfs, strict=True), start=1):
            i0, i1, t = resize_axis_indices(n, m, method, align, sf)
            if t is None:
                if not (m == n and np.array_equal(i0, np.arange(n))):
                    y = jnp.take(y, jnp.asarray(i0), axis=ax)
                continue
            dt = y.dtype if jnp.issubdtype(y.dtype, jnp.inexact) else jnp.float32
            y = y.astype(dt)
            w_shape = [1] * y.ndim
            w_shape[ax] = m
            w1 = jnp.asarray(t, dt).reshape(w_shape)
            w0 = jnp.asarray(1.0 - t, dt).reshape(w_shape)
            y = jnp.take(y, jnp.asarray(i0), axis=ax) * w0 + \
                jnp.take(y, jnp.asarray(i1), axis=ax) * w1
        return y, state

    cfg = {"scale_factor": scale_factor, "size": size, "method": method, "align_corners": align}
    return Layer(init, apply, name="upsample", config=cfg)
