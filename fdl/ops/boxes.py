"""Axis-aligned box operations: conversions, area, pairwise IoU / GIoU, clipping, validation.

Boxes are arrays whose last axis holds four coordinates. The *corner* format is ``(x0, y0, x1,
y1)`` (top-left, bottom-right; torchvision's ``"xyxy"``), the *center* format ``(cx, cy, w,
h)`` (``"cxcywh"``). Every function is pure, works on any number of leading (batch) axes and
runs under ``jit``/``vmap``/``grad``; pairwise functions take ``(..., N, 4)`` and ``(..., M,
4)`` and return ``(..., N, M)``.

IoU follows torchvision's ``box_iou`` (``inter / (area_a + area_b - inter)``, the intersection
clamped at 0) except where both boxes are empty (union 0): torchvision returns NaN there, fdl
returns 0, so an empty padding box never turns a target into NaN.

:func:`check_boxes` is the eager validation the data readers call (and that users should call on
their own annotations): it refuses NaN/inf coordinates, boxes with ``x1 < x0`` or ``y1 < y0``,
and class ids out of range, naming the offending row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "box_corner_to_center",
    "box_center_to_corner",
    "box_area",
    "box_inter_union",
    "box_iou",
    "paired_box_iou",
    "generalized_box_iou",
    "paired_generalized_box_iou",
    "clip_boxes",
    "check_boxes",
]


def _check_last(name: str, boxes, n: int = 4) -> None:
    shape = jnp.shape(boxes)
    if len(shape) < 1 or shape[-1] != n:
        raise ValueError(f"{name}: expected boxes of shape (..., {n}), got shape {tuple(shape)}")


def box_corner_to_center(boxes: jax.Array) -> jax.Array:
    """``(..., 4)`` corners ``(x0, y0, x1, y1)`` -> centers ``(cx, cy, w, h)`` (the book's
    ``box_corner_to_center``)."""
    _check_last("box_corner_to_center", boxes)
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_center_to_corner(boxes: jax.Array) -> jax.Array:
    """``(..., 4)`` centers ``(cx, cy, w, h)`` -> corners ``(x0, y0, x1, y1)``."""
    _check_last("box_center_to_corner", boxes)
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """``(..., 4)`` corner boxes -> ``(...)`` areas ``(x1 - x0) * (y1 - y0)`` (not clamped:
    an inverted box has a negative area; :func:`check_boxes` refuses those)."""
    _check_last("box_area", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_inter_union(boxes_a: jax.Array, boxes_b: jax.Array, *, name: str = "box_inter_union"
                    ) -> tuple[jax.Array, jax.Array]:
    """Pairwise intersection and union areas: ``(..., N, 4)``, ``(..., M, 4)`` ->
    ``(inter, union)``, each ``(..., N, M)``."""
    _check_last(name, boxes_a)
    _check_last(name, boxes_b)
    area_a = box_area(boxes_a)
    area_b = box_area(boxes_b)
    lt = jnp.maximum(boxes_a[..., :, None, :2], boxes_b[..., None, :, :2])
    rb = jnp.minimum(boxes_a[..., :, None, 2:], boxes_b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter, union


def _safe_div(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Pairwise IoU (Jaccard index) of corner boxes: ``(..., N, 4)``, ``(..., M, 4)`` ->
    ``(..., N, M)`` in ``[0, 1]`` for valid boxes; 0 where the union is empty."""
    inter, union = box_inter_union(boxes_a, boxes_b, name="box_iou")
    return _safe_div(inter, union)


def paired_box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """IoU of corresponding boxes: ``(..., 4)`` and ``(..., 4)`` (broadcast) -> ``(...)``."""
    _check_last("paired_box_iou", boxes_a)
    _check_last("paired_box_iou", boxes_b)
    lt = jnp.maximum(boxes_a[..., :2], boxes_b[..., :2])
    rb = jnp.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes_a) + box_area(boxes_b) - inter
    return _safe_div(inter, union)


def _giou(iou, union, lt, rb):
    wh = jnp.maximum(rb - lt, 0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - _safe_div(hull - union, hull)


def generalized_box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Pairwise generalized IoU (Rezatofighi et al. 2019): ``IoU - (hull - union) / hull``
    with ``hull`` the smallest box enclosing both; ``(..., N, M)`` in ``[-1, 1]``."""
    inter, union = box_inter_union(boxes_a, boxes_b, name="generalized_box_iou")
    iou = _safe_div(inter, union)
    lt = jnp.minimum(boxes_a[..., :, None, :2], boxes_b[..., None, :, :2])
    rb = jnp.maximum(boxes_a[..., :, None, 2:], boxes_b[..., None, :, 2:])
    return _giou(iou, union, lt, rb)


def paired_generalized_box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Generalized IoU of corresponding boxes (broadcast) -> ``(...)``; ``1 - giou`` is the
    GIoU loss."""
    _check_last("paired_generalized_box_iou", boxes_a)
    _check_last("paired_generalized_box_iou", boxes_b)
    lt = jnp.maximum(boxes_a[..., :2], boxes_b[..., :2])
    rb = jnp.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes_a) + box_area(boxes_b) - inter
    iou = _safe_div(inter, union)
    hull_lt = jnp.minimum(boxes_a[..., :2], boxes_b[..., :2])
    hull_rb = jnp.maximum(boxes_a[..., 2:], boxes_b[..., 2:])
    return _giou(iou, union, hull_lt, hull_rb)


def clip_boxes(boxes: jax.Array, size) -> jax.Array:
    """Clip corner boxes to an image of ``size = (height, width)``: x into ``[0, width]``, y
    into ``[0, height]`` (torchvision's ``clip_boxes_to_image``). ``size`` may be traced."""
    _check_last("clip_boxes", boxes)
    h, w = size
    x = jnp.clip(boxes[..., 0::2], 0, w)
    y = jnp.clip(boxes[..., 1::2], 0, h)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def check_boxes(boxes, labels=None, *, num_classes: int | None = None, name: str = "boxes",
                allow_empty: bool = False, padding_label: int | None = None) -> np.ndarray:
    """Validate boxes eagerly (NumPy, on the host); return them as a float32 array.

    Args:
      boxes: ``(..., 4)`` corner boxes ``(x0, y0, x1, y1)``.
      labels: optional integer class ids ``(...)`` matching ``boxes``' leading axes.
      num_classes: if given, every label must lie in ``[0, num_classes)``.
      name: what to call the boxes in error messages (e.g. a file name).
      allow_empty: accept a set with no boxes (default: an empty set is an error).
      padding_label: rows whose label equals this (e.g. ``-1``) are padding and are not
        checked (their coordinates may be anything).

    Raises ``ValueError`` naming the first bad row for: a wrong shape, NaN or infinite
    coordinates, ``x1 < x0`` or ``y1 < y0``, a non-integer or out-of-range class id, an empty
    set (unless ``allow_empty``).
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim < 1 or b.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (..., 4), got shape {b.shape}")
    valid = np.ones(b.shape[:-1], bool)
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != b.shape[:-1]:
            raise ValueError(f"{name}: labels of shape {lab.shape} do not match boxes of shape "
                             f"{b.shape} (expected labels of shape {b.shape[:-1]})")
        labf = lab.astype(np.float64)
        if not np.all(np.isfinite(labf)) or np.any(labf != np.round(labf)):
            bad = np.argwhere(~np.isfinite(labf) | (labf != np.round(labf)))[0]
            raise ValueError(f"{name}: class id at {tuple(bad)} is not an integer: "
                             f"{lab[tuple(bad)]!r}")
        if padding_label is not None:
            valid = labf != padding_label
        if num_classes is not None:
            out = valid & ((labf < 0) | (labf >= num_classes))
            if out.any():
                bad = tuple(np.argwhere(out)[0])
                raise ValueError(
                    f"{name}: class id {lab[bad]!r} at {bad} is out of range; valid ids are "
                    f"0..{num_classes - 1}" + (f" (and {padding_label} for padding)"
                                               if padding_label is not None else ""))
    if not allow_empty and not valid.any():
        raise ValueError(f"{name}: the set of boxes is empty (shape {b.shape}); every image "
                         "needs at least one box (pass allow_empty=True to accept images "
                         "without objects)")
    finite = np.all(np.isfinite(b), axis=-1)
    if np.any(valid & ~finite):
        bad = tuple(np.argwhere(valid & ~finite)[0])
        raise ValueError(f"{name}: box {bad} has a NaN or infinite coordinate: {b[bad].tolist()}")
    inverted = (b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1])
    if np.any(valid & inverted):
        bad = tuple(np.argwhere(valid & inverted)[0])
        raise ValueError(f"{name}: box {bad} = {b[bad].tolist()} has x1 < x0 or y1 < y0; boxes "
                         "must be corners (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
    return b.astype(np.float32)
