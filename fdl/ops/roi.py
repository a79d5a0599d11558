"""RoI pooling and RoI align (Fast R-CNN, Mask R-CNN) on NHWC feature maps, under ``jit``.

Both follow torchvision's CPU kernels (``torchvision.ops.roi_pool`` / ``roi_align``) exactly,
with channels last:

- features ``(N, H, W, C)``; ``boxes`` ``(K, 4)`` corner boxes ``(x0, y0, x1, y1)`` in input
  coordinates and ``box_indices`` ``(K,)`` the image of each box (torchvision's ``(K, 5)``
  rois split in two); ``spatial_scale`` maps box coordinates to feature coordinates (1/16 for
  a stride-16 map).
- result ``(K, out_h, out_w, C)``.

``roi_align``: every output bin averages ``grid_h * grid_w`` bilinear samples at ``start + (i
+ 0.5) * bin / grid``; samples outside ``[-1, H] x [-1, W]`` count as 0, coordinates in ``[-1,
0]`` are clamped to 0. ``aligned=True`` shifts the box by half a pixel (``-0.5``, Detectron2's
``ROIAlignV2``); ``aligned=False`` is the legacy version (boxes at least 1x1). The grid is
``sampling_ratio`` per side, or adaptive (``ceil(roi_size / out_size)``, per box) when
``sampling_ratio <= 0``: under ``jit`` the adaptive grid needs a static bound,
``max_sampling_ratio`` (the grid is ``min(ceil(roi_size / out_size), max_sampling_ratio)``);
called on concrete boxes the bound is computed exactly. Differentiable in the features and
(almost everywhere) in the box coordinates.

``roi_pool``: box corners rounded to the feature grid (half away from zero, as C's
``round``), the box split into ``out_h x out_w`` bins ``[floor(i * bin), ceil((i + 1) *
bin))``, each bin's maximum (0 for an empty bin). Memory ``O(K * H * W * C)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["roi_align", "roi_pool"]


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) and i >= 1 for i in v):
        raise ValueError(f"{name}: output_size must be a positive int or (height, width), got {v}")
    return v


def _check(name, features, boxes, box_indices):
    if jnp.ndim(features) != 4:
        raise ValueError(f"{name}: features must be (N, H, W, C) (NHWC), got shape "
                         f"{jnp.shape(features)}")
    if jnp.ndim(boxes) != 2 or jnp.shape(boxes)[-1] != 4:
        raise ValueError(f"{name}: boxes must be (K, 4) corner boxes, got shape {jnp.shape(boxes)}")
    k = jnp.shape(boxes)[0]
    if box_indices is None:
        if jnp.shape(features)[0] != 1:
            raise ValueError(f"{name}: features hold {jnp.shape(features)[0]} images; pass "
                             "box_indices (K,) saying which image each box belongs to")
        return jnp.zeros((k,), jnp.int32)
    if jnp.shape(box_indices) != (k,):
        raise ValueError(f"{name}: box_indices must be ({k},), got shape {jnp.shape(box_indices)}")
    if not isinstance(box_indices, jax.core.Tracer):
        bi = np.asarray(box_indices)
        if bi.size and (bi.min() < 0 or bi.max() >= jnp.shape(features)[0]):
            raise ValueError(f"{name}: box_indices must lie in [0, {jnp.shape(features)[0]}), "
                             f"got values in [{bi.min()}, {bi.max()}]")
    return jnp.asarray(box_indices).astype(jnp.int32)


def _div(x, n: int):
    """``x / n`` correctly rounded: XLA's CPU backend turns a division by a scalar (even a
    non-constant one) into a multiplication by its rounded reciprocal, which moves bin edges
    by an ulp (torchvision divides); a full-shape divisor behind a barrier stays a division."""
    return x / lax.optimization_barrier(jnp.full(jnp.shape(x), n, x.dtype))


def _axis_samples(start, size, out: int, grid, gmax: int, extent: int, dtype):
    """Per box, bin and sample along one axis: low/high indices, their weights (0 outside the
    map or beyond the box's grid): ``(K, out, gmax)`` each."""
    bin_size = _div(size, out)
    i = jnp.arange(out, dtype=dtype)[None, :, None]
    g = jnp.arange(gmax, dtype=dtype)[None, None, :]
    grid_f = grid.astype(dtype)[:, None, None]
    pos = start[:, None, None] + i * bin_size[:, None, None] + (g + 0.5) * bin_size[
        :, None, None] / grid_f
    inside = (pos >= -1.0) & (pos <= extent) & (g < grid_f)
    pos = jnp.maximum(pos, 0)
    low = jnp.floor(pos).astype(jnp.int32)  # pos >= 0: int truncation == floor
    at_edge = low >= extent - 1
    high = jnp.where(at_edge, extent - 1, low + 1)
    low = jnp.where(at_edge, extent - 1, low)
    pos = jnp.where(at_edge, low.astype(dtype), pos)
    frac = pos - low
    w_low = jnp.where(inside, 1 - frac, 0)
    w_high = jnp.where(inside, frac, 0)
    return low, high, w_low, w_high


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int | Sequence[int], *,
              box_indices: jax.Array | None = None, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False,
              max_sampling_ratio: int | None = None) -> jax.Array:
    """RoI align (torchvision's ``roi_align``, channels last): ``(N, H, W, C)`` features,
    ``(K, 4)`` boxes -> ``(K, out_h, out_w, C)``. See the module docstring."""
    out_h, out_w = _pair("roi_align", output_size)
    bidx = _check("roi_align", features, boxes, box_indices)
    n, h, w, c = features.shape
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    b = jnp.asarray(boxes).astype(dtype)
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (b[:, i] * spatial_scale - offset for i in range(4))
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    if sampling_ratio > 0:
        gh = gw = jnp.full(b.shape[:1], sampling_ratio, jnp.int32)
        gmax_h = gmax_w = int(sampling_ratio)
    else:
        gh = jnp.ceil(_div(roi_h, out_h)).astype(jnp.int32)
        gw = jnp.ceil(_div(roi_w, out_w)).astype(jnp.int32)
        if isinstance(b, jax.core.Tracer):
            if max_sampling_ratio is None:
                raise ValueError(
                    "roi_align: the adaptive grid (sampling_ratio <= 0) needs a static bound "
                    "under jit; pass max_sampling_ratio= (or a sampling_ratio > 0)")
            gmax_h = gmax_w = int(max_sampling_ratio)
        else:
            gmax_h = max(int(jnp.max(gh, initial=1)), 1)
            gmax_w = max(int(jnp.max(gw, initial=1)), 1)
            if max_sampling_ratio is not None:
                gmax_h, gmax_w = min(gmax_h, max_sampling_ratio), min(gmax_w, max_sampling_ratio)
        if max_sampling_ratio is not None:
            gh, gw = jnp.minimum(gh, max_sampling_ratio), jnp.minimum(gw, max_sampling_ratio)
    count = jnp.maximum(gh * gw, 1).astype(dtype)
    yl, yh, wyl, wyh = _axis_samples(y0, roi_h, out_h, gh, gmax_h, h, dtype)
    xl, xh, wxl, wxh = _axis_samples(x0, roi_w, out_w, gw, gmax_w, w, dtype)
    flat = features.astype(dtype).reshape(n * h * w, c)
    base = (bidx * (h * w))[:, None, None, None, None]

    def corner(yi, xi, wy, wx):  # (K, out_h, gh, out_w, gw) samples -> summed over the grid
        idx = base + yi[:, :, :, None, None] * w + xi[:, None, None, :, :]
        wt = wy[:, :, :, None, None] * wx[:, None, None, :, :]
        return jnp.einsum("kagbd,kagbdc->kabc", wt, flat[idx])

    out = (corner(yl, xl, wyl, wxl) + corner(yl, xh, wyl, wxh) + corner(yh, xl, wyh, wxl)
           + corner(yh, xh, wyh, wxh))
    return (out / count[:, None, None, None]).astype(features.dtype)


def _round_half_away(x):
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def roi_pool(features: jax.Array, boxes: jax.Array, output_size: int | Sequence[int], *,
             box_indices: jax.Array | None = None, spatial_scale: float = 1.0) -> jax.Array:
    """RoI max pooling (torchvision's ``roi_pool``, channels last): ``(N, H, W, C)``,
    ``(K, 4)`` -> ``(K, out_h, out_w, C)``. See the module docstring."""
    out_h, out_w = _pair("roi_pool", output_size)
    bidx = _check("roi_pool", features, boxes, box_indices)
    n, h, w, c = features.shape
    b = jnp.asarray(boxes).astype(jnp.promote_types(boxes.dtype, jnp.float32))
    x0, y0, x1, y1 = (_round_half_away(b[:, i] * spatial_scale).astype(jnp.int32)
                      for i in range(4))

    def bins(start, end, out, extent):  # (K, out, extent) membership of every map row/column
        size = jnp.maximum(end - start + 1, 1).astype(jnp.float32)
        bin_size = _div(size, out)
        i = jnp.arange(out, dtype=jnp.float32)[None, :]
        lo = jnp.floor(i * bin_size[:, None]).astype(jnp.int32) + start[:, None]
        hi = jnp.ceil((i + 1) * bin_size[:, None]).astype(jnp.int32) + start[:, None]
        lo, hi = jnp.clip(lo, 0, extent), jnp.clip(hi, 0, extent)
        r = jnp.arange(extent)[None, None, :]
        return (r >= lo[..., None]) & (r < hi[..., None])

    in_h = bins(y0, y1, out_h, h)  # (K, out_h, H)
    in_w = bins(x0, x1, out_w, w)  # (K, out_w, W)
    f = features[bidx]  # (K, H, W, C)
    low = jnp.asarray(-jnp.inf, f.dtype)
    m1 = jnp.max(jnp.where(in_w[:, None, :, :, None], f[:, :, None], low), axis=3)
    m2 = jnp.max(jnp.where(in_h[:, :, :, None, None], m1[:, None], low), axis=2)
    empty = ~(jnp.any(in_h, -1)[:, :, None] & jnp.any(in_w, -1)[:, None, :])
    return jnp.where(empty[..., None], jnp.zeros((), f.dtype), m2)

