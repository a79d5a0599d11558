"""Non-maximum suppression under ``jit``: fixed-size outputs, ``-1`` padding and a count.

``nms(boxes, scores, iou_threshold)`` keeps what torchvision's ``nms`` keeps, in the same order:
boxes are visited by decreasing score (ties by index: a stable sort), and a box is discarded
when its IoU with an already kept box is greater than ``iou_threshold``. Because the number of
kept boxes depends on the data, the result has a fixed length ``max_outputs`` (default: every
box): ``NMSResult(indices, count)`` with ``indices[:count]`` the kept indices by decreasing
score and ``-1`` after them. With ``max_outputs=k`` the first ``k`` of torchvision's result
are returned (and the work stops once ``k`` boxes are kept).

``batched_nms`` is class-aware through torchvision's coordinate-offset trick: every box is
shifted by ``class_id * (max_coordinate + 1)`` so boxes of different classes never overlap,
then one ``nms`` runs. Leading batch axes (``(..., N, 4)``) are mapped with ``vmap``.

Algorithm (exact, not an approximation): boxes are sorted once and processed in tiles of
``tile`` boxes. A tile's boxes are first suppressed by the boxes kept so far (IoU against the
compacted list of kept boxes, one tile of it at a time), then among themselves by a fixed-point
iteration ``keep = candidate & ~any_j<i(keep[j] & iou[j, i] > t)``, which reaches the greedy
result (after ``k`` rounds the first ``k`` boxes are final; it usually settles in a few).
The comparison ``iou > iou_threshold`` is done as torchvision does it (the float32 IoU against
the double threshold), so decisions at the threshold agree bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl.ops.boxes import box_inter_union

__all__ = ["NMSResult", "nms", "batched_nms", "nms_mask"]


class NMSResult(NamedTuple):
    """``indices`` ``(..., max_outputs)`` int32: kept box indices by decreasing score, ``-1``
    after the first ``count``; ``count`` ``(...)`` int32: the number kept."""

    indices: jax.Array
    count: jax.Array


def _threshold(iou_threshold, dtype):
    """The ``dtype`` threshold ``t`` with ``x > t  <=>  x > iou_threshold`` for every ``x`` of
    ``dtype`` (torchvision compares the float32 IoU with a double)."""
    if isinstance(iou_threshold, (int, float, np.floating, np.integer)):
        thr = float(iou_threshold)
        if not 0.0 <= thr <= 1.0 or math.isnan(thr):
            raise ValueError(f"nms: iou_threshold must be in [0, 1], got {iou_threshold!r}")
        np_dtype = np.dtype(dtype)
        t = np_dtype.type(thr)
        if float(t) > thr:
            t = np.nextafter(t, np_dtype.type(-np.inf))
        return jnp.asarray(t, dtype)
    return jnp.asarray(iou_threshold, dtype)


def _raw_iou(a, b):
    inter, union = box_inter_union(a, b)
    return inter / union  # NaN for two empty boxes: NaN > t is False, as in torchvision


def _nms_single(boxes, scores, candidate, thr, max_outputs: int, tile: int):
    n = boxes.shape[0]
    order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
    n_pad = -(-n // tile) * tile
    sboxes = jnp.zeros((n_pad, 4), boxes.dtype).at[:n].set(boxes[order])
    scand = jnp.zeros((n_pad,), bool).at[:n].set(candidate[order])
    sorder = jnp.full((n_pad,), -1, jnp.int32).at[:n].set(order)
    k_pad = -(-max_outputs // tile) * tile
    kept_boxes = jnp.zeros((k_pad, 4), boxes.dtype)
    out = jnp.full((max_outputs,), -1, jnp.int32)
    earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # j < i: j may suppress i

    def tile_body(carry):
        t, count, kept_boxes, out = carry
        b = lax.dynamic_slice_in_dim(sboxes, t * tile, tile)
        cand = lax.dynamic_slice_in_dim(scand, t * tile, tile)

        def cross(s, suppressed):  # suppression by the kept boxes of tile s of the kept list
            kb = lax.dynamic_slice_in_dim(kept_boxes, s * tile, tile)
            live = (s * tile + jnp.arange(tile)) < count
            hit = (_raw_iou(kb, b) > thr) & live[:, None]
            return suppressed | jnp.any(hit, axis=0)

        n_kept_tiles = (count + tile - 1) // tile
        suppressed = lax.fori_loop(0, n_kept_tiles, cross, jnp.zeros((tile,), bool))
        keep0 = cand & ~suppressed
        over = (_raw_iou(b, b) > thr) & earlier

        def settle(state):
            keep, _ = state
            new = keep0 & ~jnp.any(over & keep[:, None], axis=0)
            return new, jnp.any(new != keep)

        keep, _ = lax.while_loop(lambda s: s[1], settle, (keep0, jnp.array(True)))
        pos = count + jnp.cumsum(keep) - 1
        slot = jnp.where(keep & (pos < max_outputs), pos, k_pad)  # out of range: dropped
        idx = lax.dynamic_slice_in_dim(sorder, t * tile, tile)
        kept_boxes = kept_boxes.at[slot].set(b, mode="drop")
        out = out.at[slot].set(idx, mode="drop")
        count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_outputs)
        return t + 1, count, kept_boxes, out

    def more(carry):
        t, count, _, _ = carry
        return (t < n_pad // tile) & (count < max_outputs)

    init = (jnp.int32(0), jnp.int32(0), kept_boxes, out)
    _, count, _, out = lax.while_loop(more, tile_body, init)
    return out, count


def _prepare(name, boxes, scores, valid, score_threshold, max_outputs, tile):
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (..., N, 4), got {boxes.shape}")
    if scores.shape != boxes.shape[:-1]:
        raise ValueError(f"{name}: scores of shape {scores.shape} do not match boxes of shape "
                         f"{boxes.shape} (expected {boxes.shape[:-1]})")
    n = boxes.shape[-2]
    if max_outputs is None:
        max_outputs = n
    if (not isinstance(max_outputs, int) or isinstance(max_outputs, bool) or max_outputs < 1):
        raise ValueError(f"{name}: max_outputs must be an integer >= 1, got {max_outputs!r}")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{name}: tile must be an integer >= 1, got {tile!r}")
    dtype = jnp.promote_types(boxes.dtype, jnp.float32)
    boxes = lax.stop_gradient(boxes.astype(dtype))
    scores = lax.stop_gradient(scores)
    candidate = jnp.ones(scores.shape, bool)
    if valid is not None:
        valid = jnp.asarray(valid)
        if valid.shape != scores.shape:
            raise ValueError(f"{name}: valid of shape {valid.shape} must match scores "
                             f"{scores.shape}")
        candidate = candidate & valid.astype(bool)
    if score_threshold is not None:
        candidate = candidate & (scores > score_threshold)
    return boxes, scores, candidate, max_outputs, min(tile, max(n, 1))


def _run(boxes, scores, candidate, thr, max_outputs, tile):
    n = boxes.shape[-2]
    lead = boxes.shape[:-2]
    if n == 0:
        return NMSResult(jnp.full((*lead, max_outputs), -1, jnp.int32),
                         jnp.zeros(lead, jnp.int32))
    fn = lambda b, s, c: _nms_single(b, s, c, thr, max_outputs, tile)  # noqa: E731
    for _ in lead:
        fn = jax.vmap(fn)
    return NMSResult(*fn(boxes, scores, candidate))


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, *,
        max_outputs: int | None = None, score_threshold: float | None = None,
        valid: jax.Array | None = None, tile: int = 256) -> NMSResult:
    """Greedy non-maximum suppression (torchvision's ``nms``), fixed-size for ``jit``.

    Args:
      boxes: ``(..., N, 4)`` corner boxes ``(x0, y0, x1, y1)``.
      scores: ``(..., N)``.
      iou_threshold: discard a box whose IoU with a kept box is ``> iou_threshold``. A Python
        float (static) is compared exactly as torchvision does; a traced value is compared in
        the boxes' dtype (which can differ at an IoU equal to the rounded threshold).
      max_outputs: length of the result (static); default ``N``.
      score_threshold: only boxes with ``score > score_threshold`` are candidates.
      valid: ``(..., N)`` bool mask; ``False`` boxes are never kept (padding).
      tile: boxes processed per block (static; a tuning knob, the result does not depend on it).

    Returns :class:`NMSResult` ``(indices (..., max_outputs) int32, count (...) int32)``.
    """
    boxes, scores, cand, k, tile = _prepare("nms", boxes, scores, valid, score_threshold,
                                            max_outputs, tile)
    return _run(boxes, scores, cand, _threshold(iou_threshold, boxes.dtype), k, tile)


def batched_nms(boxes: jax.Array, scores: jax.Array, class_ids: jax.Array,
                iou_threshold: float, *, max_outputs: int | None = None,
                score_threshold: float | None = None, valid: jax.Array | None = None,
                tile: int = 256) -> NMSResult:
    """Class-aware NMS (torchvision's ``batched_nms``): boxes of different ``class_ids``
    ``(..., N)`` never suppress each other. Implemented with the coordinate-offset trick: boxes
    are shifted by ``class_id * (max_coordinate - min(min_coordinate, 0) + 1)`` (torchvision's
    ``max_coordinate + 1`` for non-negative boxes; the extra term keeps classes apart when
    coordinates are negative). Other arguments and the result as :func:`nms`."""
    boxes, scores, cand, k, tile = _prepare("batched_nms", boxes, scores, valid,
                                            score_threshold, max_outputs, tile)
    class_ids = jnp.asarray(class_ids)
    if class_ids.shape != scores.shape:
        raise ValueError(f"batched_nms: class_ids of shape {class_ids.shape} must match scores "
                         f"{scores.shape}")
    if boxes.shape[-2] > 0:
        hi = jnp.max(boxes, axis=(-2, -1), keepdims=True)
        lo = jnp.minimum(jnp.min(boxes, axis=(-2, -1), keepdims=True), 0)
        offsets = class_ids.astype(boxes.dtype)[..., None] * (hi - lo + 1)
        boxes = boxes + offsets
    return _run(boxes, scores, cand, _threshold(iou_threshold, boxes.dtype), k, tile)


def nms_mask(result: NMSResult, num_boxes: int) -> jax.Array:
    """``(..., num_boxes)`` bool: which boxes ``result`` kept."""
    idx = jnp.where(result.indices >= 0, result.indices, num_boxes)
    lead = idx.shape[:-1]
    flat = idx.reshape(-1, idx.shape[-1])
    mask = jax.vmap(lambda i: jnp.zeros((num_boxes,), bool).at[i].set(True, mode="drop"))(flat)
    return mask.reshape(*lead, num_boxes)
