"""Anchor boxes, their assignment to ground truth, offsets and detection (d2l ch. 14.4).

Everything here follows the book's functions exactly and runs under ``jit``/``vmap``:

- :func:`multibox_prior` — the book's ``multibox_prior``: for every pixel of a feature map,
  anchors of sizes ``s1..sn`` with ratio ``r1`` and of size ``s1`` with ratios ``r2..rm``
  (``n + m - 1`` per pixel), in coordinates normalised by the map size.
- :func:`assign_anchor_to_bbox` — the book's greedy assignment: repeatedly take the largest
  remaining IoU, pair that anchor with that box and discard its row and column; every other
  anchor takes its best box when that IoU is ``>= iou_threshold``.
- :func:`offset_boxes` / :func:`offset_inverse` — the book's offsets with its scaling
  (``10 * dxy / wh_anchor``, ``5 * log(eps + wh / wh_anchor)``) and their inverse.
- :func:`multibox_target` — offsets, masks and labels (background 0, class ``c`` as ``c + 1``)
  for a batch of ground truth padded to ``max_objects`` rows with class ``-1``.
- :func:`multibox_detection` — the book's ``multibox_detection`` with a fixed-size output.

Ground truth is ``(batch, max_objects, 5)``: rows ``(class, x0, y0, x1, y1)`` with class ``-1``
for padding (the book's label layout; the readers in :mod:`fdl.data.detection` produce it).
Padding rows take no part in the assignment; an image whose rows are all padding gets an
all-background target. Bad ground truth cannot raise inside ``jit``: :func:`check_targets`
validates eagerly (the readers call it, and :func:`multibox_target` calls it on concrete
inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl.ops.boxes import box_center_to_corner, box_corner_to_center, box_iou, check_boxes
from fdl.ops.nms import nms

__all__ = [
    "multibox_prior",
    "num_anchors_per_pixel",
    "assign_anchor_to_bbox",
    "offset_boxes",
    "offset_inverse",
    "multibox_target",
    "multibox_detection",
    "check_targets",
]


def num_anchors_per_pixel(sizes: Sequence[float], ratios: Sequence[float]) -> int:
    """``len(sizes) + len(ratios) - 1``."""
    return len(sizes) + len(ratios) - 1


def multibox_prior(feature_shape: Sequence[int], sizes: Sequence[float],
                   ratios: Sequence[float], dtype=jnp.float32) -> jax.Array:
    """Anchors centred on every pixel of a ``(height, width)`` feature map.

    ``feature_shape`` is ``(height, width)`` or an NHWC shape ``(N, H, W, C)``. Returns
    ``(H * W * (n + m - 1), 4)`` corner boxes normalised to ``[0, 1]`` (they may extend past
    it), ordered by pixel (row-major) and then by anchor: ``(s1, r1), ..., (sn, r1), (s1,
    r2), ..., (s1, rm)``. Widths are scaled by ``H / W`` as in the book (square anchors on a
    rectangular map stay square in pixels). Computed with NumPy: a constant under ``jit``.
    """
    shape = tuple(int(s) for s in feature_shape)
    if len(shape) == 4:
        shape = shape[1:3]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"multibox_prior: feature_shape must be (H, W) or (N, H, W, C) with "
                         f"positive sizes, got {tuple(feature_shape)}")
    sizes = [float(s) for s in sizes]
    ratios = [float(r) for r in ratios]
    if not sizes or not ratios or min(sizes) <= 0 or min(ratios) <= 0:
        raise ValueError(f"multibox_prior: sizes and ratios must be non-empty and positive, got "
                         f"sizes={sizes}, ratios={ratios}")
    h, w = shape
    f32 = np.float32
    size_t = np.asarray(sizes, f32)
    ratio_t = np.asarray(ratios, f32)
    center_h = (np.arange(h, dtype=f32) + f32(0.5)) * f32(1.0 / h)
    center_w = (np.arange(w, dtype=f32) + f32(0.5)) * f32(1.0 / w)
    shift_y, shift_x = np.meshgrid(center_h, center_w, indexing="ij")
    shift_y, shift_x = shift_y.reshape(-1), shift_x.reshape(-1)
    aw = np.concatenate([size_t * np.sqrt(ratio_t[0]), size_t[0] * np.sqrt(ratio_t[1:])])
    aw = aw * f32(h) / f32(w)
    ah = np.concatenate([size_t / np.sqrt(ratio_t[0]), size_t[0] / np.sqrt(ratio_t[1:])])
    manip = np.tile(np.stack([-aw, -ah, aw, ah]).T, (h * w, 1)) / f32(2)
    per_pixel = len(sizes) + len(ratios) - 1
    grid = np.repeat(np.stack([shift_x, shift_y, shift_x, shift_y], axis=1), per_pixel, axis=0)
    return jnp.asarray((grid + manip).astype(f32), dtype)


def _valid_rows(labels: jax.Array) -> jax.Array:
    return labels[..., 0] >= 0


def assign_anchor_to_bbox(ground_truth: jax.Array, anchors: jax.Array,
                          iou_threshold: float = 0.5, valid: jax.Array | None = None
                          ) -> jax.Array:
    """The book's ``assign_anchor_to_bbox``: ``(M, 4)`` boxes, ``(A, 4)`` anchors -> ``(A,)``
    int32, the assigned box of every anchor or ``-1``.

    ``valid`` ``(M,)`` marks real boxes (padding rows take no part). Greedy step: for as many
    rounds as there are boxes, the largest remaining IoU ``(anchor i, box j)`` (first in
    row-major order on ties, as ``torch.argmax``) assigns box ``j`` to anchor ``i`` and removes
    row ``i`` and column ``j``; before that, every anchor whose best IoU is ``>= iou_threshold``
    takes its best box, and the greedy pairs override. Needs ``A >= M``."""
    num_boxes = ground_truth.shape[0]
    jaccard = box_iou(anchors, ground_truth)
    if valid is None:
        valid = jnp.ones((num_boxes,), bool)
    # padding columns: below the discard value, so they never win and never pass the threshold
    jaccard = jnp.where(valid[None, :], jaccard, -2.0)
    max_ious = jnp.max(jaccard, axis=1)
    best = jnp.argmax(jaccard, axis=1).astype(jnp.int32)
    amap = jnp.where(max_ious >= iou_threshold, best, -1)

    def greedy(_, carry):
        jac, amap = carry
        flat = jnp.argmax(jac)
        anc, box = flat // num_boxes, flat % num_boxes
        take = jac.reshape(-1)[flat] >= 0  # a real box with an undiscarded anchor remains
        amap = jnp.where(take, amap.at[anc].set(box.astype(jnp.int32)), amap)
        jac = jnp.where(take, jac.at[:, box].set(-1.0).at[anc, :].set(-1.0), jac)
        return jac, amap

    _, amap = lax.fori_loop(0, num_boxes, greedy, (jaccard, amap))
    return amap


def offset_boxes(anchors: jax.Array, assigned_bb: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The book's offsets of boxes from anchors (``(..., 4)`` corners each): ``(10 * (c_b -
    c_a) / wh_a, 5 * log(eps + wh_b / wh_a))`` -> ``(..., 4)``."""
    c_anc = box_corner_to_center(anchors)
    c_bb = box_corner_to_center(assigned_bb)
    offset_xy = 10 * (c_bb[..., :2] - c_anc[..., :2]) / c_anc[..., 2:]
    offset_wh = 5 * jnp.log(eps + c_bb[..., 2:] / c_anc[..., 2:])
    return jnp.concatenate([offset_xy, offset_wh], axis=-1)


def offset_inverse(anchors: jax.Array, offset_preds: jax.Array) -> jax.Array:
    """Boxes from anchors and predicted offsets (the book's ``offset_inverse``; the inverse of
    :func:`offset_boxes` up to its ``eps``): ``(..., 4)`` each -> ``(..., 4)`` corners."""
    anc = box_corner_to_center(anchors)
    xy = offset_preds[..., :2] * anc[..., 2:] / 10 + anc[..., :2]
    wh = jnp.exp(offset_preds[..., 2:] / 5) * anc[..., 2:]
    return box_center_to_corner(jnp.concatenate([xy, wh], axis=-1))


def check_targets(labels, *, num_classes: int | None = None, max_objects: int | None = None,
                  name: str = "ground truth") -> np.ndarray:
    """Validate padded ground truth ``(batch, max_objects, 5)`` eagerly; return it as float32.

    Refuses: a wrong shape or no rows at all (``max_objects == 0``), a row count other than
    ``max_objects`` (when given), NaN/inf coordinates, ``x1 < x0``/``y1 < y0``, non-integer
    class ids or ids outside ``[0, num_classes)`` (``-1`` marks padding)."""
    lab = np.asarray(labels, dtype=np.float64)
    if lab.ndim != 3 or lab.shape[-1] != 5:
        raise ValueError(f"{name}: expected ground truth of shape (batch, max_objects, 5) with "
                         f"rows (class, x0, y0, x1, y1), got shape {lab.shape}")
    if lab.shape[1] == 0:
        raise ValueError(f"{name}: the ground truth has no rows (shape {lab.shape}); pad every "
                         "image to max_objects >= 1 rows with class -1")
    if max_objects is not None and lab.shape[1] != max_objects:
        raise ValueError(f"{name}: expected max_objects={max_objects} rows per image, got "
                         f"{lab.shape[1]}")
    cls = lab[..., 0]
    if np.any((cls < 0) & (cls != -1)):
        bad = tuple(np.argwhere((cls < 0) & (cls != -1))[0])
        raise ValueError(f"{name}: class id {cls[bad]!r} at {bad} is negative; only -1 (padding) "
                         "is allowed")
    check_boxes(lab[..., 1:], cls, num_classes=num_classes, name=name, allow_empty=True,
                padding_label=-1)
    return lab.astype(np.float32)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def multibox_target(anchors: jax.Array, labels: jax.Array, *, iou_threshold: float = 0.5,
                    num_classes: int | None = None, eps: float = 1e-6
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The book's ``multibox_target`` over padded ground truth.

    Args:
      anchors: ``(A, 4)`` (or the book's ``(1, A, 4)``).
      labels: ``(batch, max_objects, 5)`` rows ``(class, x0, y0, x1, y1)``, class ``-1`` for
        padding (checked eagerly with :func:`check_targets` when not traced).
      iou_threshold: the assignment threshold.
      num_classes: if given, the eager check also refuses class ids ``>= num_classes``.

    Returns ``(bbox_offset (batch, A * 4), bbox_mask (batch, A * 4), class_labels (batch, A)
    int32)``: offsets of the assigned boxes (0 where unassigned), 1/0 masks, and ``class + 1``
    for assigned anchors, 0 (background) otherwise.
    """
    anchors = jnp.asarray(anchors)
    if anchors.ndim == 3 and anchors.shape[0] == 1:
        anchors = anchors[0]
    if anchors.ndim != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"multibox_target: anchors must be (A, 4), got {anchors.shape}")
    if _is_concrete(labels):
        check_targets(labels, num_classes=num_classes, name="multibox_target labels")
    labels = jnp.asarray(labels)
    if labels.ndim != 3 or labels.shape[-1] != 5 or labels.shape[1] == 0:
        raise ValueError(f"multibox_target: labels must be (batch, max_objects >= 1, 5), got "
                         f"{labels.shape}")
    if anchors.shape[0] < labels.shape[1]:
        raise ValueError(f"multibox_target: {anchors.shape[0]} anchors cannot be paired with "
                         f"up to {labels.shape[1]} boxes (need at least as many anchors)")
    labels = lax.stop_gradient(labels.astype(anchors.dtype))

    def one(label):
        valid = _valid_rows(label)
        amap = assign_anchor_to_bbox(label[:, 1:], anchors, iou_threshold, valid)
        assigned = amap >= 0
        bb_idx = jnp.maximum(amap, 0)
        class_labels = jnp.where(assigned, label[bb_idx, 0].astype(jnp.int32) + 1, 0)
        assigned_bb = jnp.where(assigned[:, None], label[bb_idx, 1:], 0.0)
        mask = jnp.repeat(assigned[:, None].astype(anchors.dtype), 4, axis=1)
        offset = offset_boxes(anchors, assigned_bb, eps) * mask
        return offset.reshape(-1), mask.reshape(-1), class_labels

    return jax.vmap(one)(labels)


def _book_order(keep_idx, count, num_anchors):
    """The book's row order: kept indices (by score), then the others by index."""
    kept = jnp.zeros((num_anchors,), bool).at[jnp.where(keep_idx >= 0, keep_idx, num_anchors)
                                             ].set(True, mode="drop")
    rest_rank = jnp.cumsum(~kept) - 1
    pos = jnp.where(kept, 0, count + rest_rank)
    pos = pos.at[jnp.where(keep_idx >= 0, keep_idx, num_anchors)].set(
        jnp.arange(num_anchors, dtype=pos.dtype), mode="drop")
    return jnp.zeros((num_anchors,), jnp.int32).at[pos].set(
        jnp.arange(num_anchors, dtype=jnp.int32)), kept


def multibox_detection(cls_probs: jax.Array, offset_preds: jax.Array, anchors: jax.Array, *,
                       nms_threshold: float = 0.5, pos_threshold: float = 0.009999999,
                       class_aware: bool = False) -> jax.Array:
    """The book's ``multibox_detection``, fixed-size: ``(batch, A, 6)`` rows ``(class, score,
    x0, y0, x1, y1)``.

    Args:
      cls_probs: ``(batch, num_classes + 1, A)`` probabilities, background first (the book's
        layout: ``softmax(cls_preds).transpose(0, 2, 1)``).
      offset_preds: ``(batch, A * 4)``.
      anchors: ``(A, 4)`` or ``(1, A, 4)``.
      nms_threshold: NMS IoU threshold.
      pos_threshold: rows scoring below it become background (class ``-1``, score ``1 - p``).
      class_aware: ``False`` (the book) runs one NMS over all classes; ``True`` runs it per
        class (coordinate-offset trick).

    Rows as in the book: kept boxes by decreasing score, then the suppressed ones by anchor
    index with class ``-1``. Keep rows with ``class >= 0`` (and e.g. ``score >= 0.9``) to
    display; :func:`fdl.models.detection.detections_to_list` does that on the host.
    """
    anchors = jnp.asarray(anchors)
    if anchors.ndim == 3:
        anchors = anchors[0]
    num_anchors = anchors.shape[0]
    if cls_probs.ndim != 3 or cls_probs.shape[2] != num_anchors:
        raise ValueError(f"multibox_detection: cls_probs must be (batch, classes + 1, "
                         f"{num_anchors}), got {cls_probs.shape}")
    if offset_preds.shape != (cls_probs.shape[0], num_anchors * 4):
        raise ValueError(f"multibox_detection: offset_preds must be ({cls_probs.shape[0]}, "
                         f"{num_anchors * 4}), got {offset_preds.shape}")

    def one(cls_prob, offset_pred):
        conf = jnp.max(cls_prob[1:], axis=0)
        class_id = jnp.argmax(cls_prob[1:], axis=0).astype(jnp.int32)
        boxes = offset_inverse(anchors, offset_pred.reshape(-1, 4))
        if class_aware:
            from fdl.ops.nms import batched_nms

            res = batched_nms(boxes, conf, class_id, nms_threshold)
        else:
            res = nms(boxes, conf, nms_threshold)
        order, kept = _book_order(res.indices, res.count, num_anchors)
        class_id = jnp.where(kept, class_id, -1)[order]
        conf, boxes = conf[order], boxes[order]
        below = conf < pos_threshold
        class_id = jnp.where(below, -1, class_id)
        conf = jnp.where(below, 1 - conf, conf)
        return jnp.concatenate([class_id[:, None].astype(conf.dtype), conf[:, None], boxes],
                               axis=1)

    return jax.vmap(one)(cls_probs, offset_preds)
