"""A YOLO-style one-stage detector (Redmon et al. 2016, "YOLOv1"): an ``S x S`` grid, ``B``
boxes per cell with a confidence each, one class distribution per cell.

The head is a 1x1 convolution from backbone features ``(N, S, S, C)`` to ``(N, S, S, B * 5 +
num_classes)``: per box ``(tx, ty, tw, th, tc)``, then the class logits. Outputs are bounded as
in later YOLOs (v1 regresses raw values): the box centre is ``((col, row) + sigmoid(tx, ty)) /
S``, its square-root size ``sigmoid(tw, th)`` (v1 regresses ``sqrt(w)``, ``sqrt(h)``), the
confidence ``sigmoid(tc)``; coordinates are normalised to ``[0, 1]``.

Loss (v1's sum-squared error, per image): the cell containing an object's centre is
responsible for it (the later object wins when two share a cell); of its ``B`` boxes the one
with the highest IoU with the object is responsible:

``lambda_coord * [(x - x*)^2 + (y - y*)^2 + (sqrt w - sqrt w*)^2 + (sqrt h - sqrt h*)^2]``
(centres in cell units) ``+ (c - IoU)^2`` for the responsible box (the IoU a constant target,
as v1; ``conf_target="one"`` uses 1), ``lambda_noobj * c^2`` for every other box, and
``sum_k (p_k - 1[k = class])^2`` of the softmax class probabilities in cells with an object
(``class_loss="cross_entropy"`` uses the cross-entropy instead).

Ground truth is the usual ``(N, max_objects, 5)`` rows ``(class, x0, y0, x1, y1)``, normalised
coordinates, class ``-1`` padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fdl import nn
from fdl.models.detection.rcnn import check_ground_truth, resnet_trunk
from fdl.nn.core import Layer, ShapeError, apply_child, child_key, init_child
from fdl.ops.boxes import box_center_to_corner, paired_box_iou
from fdl.ops.nms import batched_nms

__all__ = ["yolo_head", "yolo_decode", "yolo_targets", "yolo_loss", "yolo_detect", "yolo"]


def yolo_head(num_classes: int, num_boxes: int = 2) -> Layer:
    """A 1x1 convolution ``(N, S, S, C) -> (N, S, S, num_boxes * 5 + num_classes)``."""
    nn.check_positive_int("yolo_head", "num_classes", num_classes)
    nn.check_positive_int("yolo_head", "num_boxes", num_boxes)
    conv = nn.conv2d(num_boxes * 5 + num_classes, 1)
    return Layer(conv.init, conv.apply, name="yolo_head",
                 config={"num_classes": num_classes, "num_boxes": num_boxes})


def _split(raw, num_classes, num_boxes):
    if raw.ndim != 4:
        raise ShapeError("yolo", f"expected raw predictions (N, S, S, num_boxes * 5 + "
                                 f"num_classes), got shape {raw.shape}")
    n, s1, s2, d = raw.shape
    if d != num_boxes * 5 + num_classes:
        raise ValueError(f"yolo: expected {num_boxes * 5 + num_classes} channels (num_boxes * 5 "
                         f"+ num_classes), got raw predictions of shape {raw.shape}")
    box = raw[..., : num_boxes * 5].reshape(n, s1, s2, num_boxes, 5)
    return box, raw[..., num_boxes * 5:]


def yolo_decode(raw: jax.Array, num_classes: int, num_boxes: int = 2) -> dict[str, jax.Array]:
    """``(N, S, S, B * 5 + K)`` -> ``{"boxes": (N, S, S, B, 4)`` normalised corners,
    ``"confidence": (N, S, S, B)``, ``"offsets": (N, S, S, B, 2)`` (centre within the cell),
    ``"sqrt_wh": (N, S, S, B, 2)``, ``"class_logits": (N, S, S, K)}``."""
    box, cls = _split(raw, num_classes, num_boxes)
    s_h, s_w = raw.shape[1:3]
    off = jax.nn.sigmoid(box[..., 0:2])
    sqrt_wh = jax.nn.sigmoid(box[..., 2:4])
    col = jnp.arange(s_w, dtype=raw.dtype)[None, None, :, None]
    row = jnp.arange(s_h, dtype=raw.dtype)[None, :, None, None]
    cx = (col + off[..., 0]) / s_w
    cy = (row + off[..., 1]) / s_h
    centre = jnp.stack([cx, cy, sqrt_wh[..., 0] ** 2, sqrt_wh[..., 1] ** 2], axis=-1)
    return {"boxes": box_center_to_corner(centre), "confidence": jax.nn.sigmoid(box[..., 4]),
            "offsets": off, "sqrt_wh": sqrt_wh, "class_logits": cls}


def yolo_targets(gt: jax.Array, grid: tuple[int, int]) -> dict[str, jax.Array]:
    """Per cell: ``{"object": (N, S, S) bool, "box": (N, S, S, 4)`` the responsible object's
    normalised corners, ``"cls": (N, S, S)`` int32 its class}``; a cell takes the last object
    (highest row index) whose centre falls in it."""
    check_ground_truth("yolo_targets", gt)
    s_h, s_w = grid
    gt = lax.stop_gradient(gt)

    def one(g):
        valid = g[:, 0] >= 0
        cx = (g[:, 1] + g[:, 3]) / 2
        cy = (g[:, 2] + g[:, 4]) / 2
        col = jnp.clip(jnp.floor(cx * s_w), 0, s_w - 1).astype(jnp.int32)
        row = jnp.clip(jnp.floor(cy * s_h), 0, s_h - 1).astype(jnp.int32)
        cell = jnp.where(valid, row * s_w + col, s_h * s_w)  # padding: an extra dropped cell
        owner = jnp.full((s_h * s_w + 1,), -1, jnp.int32).at[cell].max(
            jnp.arange(g.shape[0], dtype=jnp.int32))[: s_h * s_w]
        has = owner >= 0
        src = g[jnp.maximum(owner, 0)]
        return (has.reshape(s_h, s_w), jnp.where(has[:, None], src[:, 1:], 0.0).reshape(
            s_h, s_w, 4), jnp.where(has, src[:, 0], 0).astype(jnp.int32).reshape(s_h, s_w))

    obj, box, cls = jax.vmap(one)(gt)
    return {"object": obj, "box": box, "cls": cls}


def yolo_loss(raw: jax.Array, gt: jax.Array, *, num_classes: int, num_boxes: int = 2,
              lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
              class_loss: str = "squared_error", conf_target: str = "iou") -> jax.Array:
    """The YOLOv1 loss of the module docstring, per image ``(N,)``."""
    if class_loss not in ("squared_error", "cross_entropy"):
        raise ValueError(f"yolo_loss: class_loss must be 'squared_error' or 'cross_entropy', "
                         f"got {class_loss!r}")
    if conf_target not in ("iou", "one"):
        raise ValueError(f"yolo_loss: conf_target must be 'iou' or 'one', got {conf_target!r}")
    p = yolo_decode(raw, num_classes, num_boxes)
    check_ground_truth("yolo_loss", gt, raw.shape[0])
    s_h, s_w = raw.shape[1:3]
    t = yolo_targets(gt, (s_h, s_w))
    obj = t["object"]
    iou = paired_box_iou(p["boxes"], t["box"][..., None, :])  # (N, S, S, B)
    iou = lax.stop_gradient(iou)
    resp = jax.nn.one_hot(jnp.argmax(iou, -1), num_boxes, dtype=raw.dtype) * obj[..., None]
    # targets in the head's own units: centre offsets within the cell and square-root sizes
    tb = t["box"]
    tc = jnp.stack([(tb[..., 0] + tb[..., 2]) / 2 * s_w, (tb[..., 1] + tb[..., 3]) / 2 * s_h],
                   -1)
    cell = jnp.stack(jnp.meshgrid(jnp.arange(s_w), jnp.arange(s_h), indexing="xy"), -1)
    t_off = tc - cell.astype(raw.dtype)[None]
    t_sqrt = jnp.sqrt(jnp.maximum(tb[..., 2:] - tb[..., :2], 0))
    coord = (jnp.sum((p["offsets"] - t_off[..., None, :]) ** 2, -1)
             + jnp.sum((p["sqrt_wh"] - t_sqrt[..., None, :]) ** 2, -1))
    conf = p["confidence"]
    target = iou if conf_target == "iou" else 1.0
    conf_loss = resp * (conf - target) ** 2 + lambda_noobj * (1 - resp) * conf ** 2
    if class_loss == "cross_entropy":
        cls_l = nn.losses.softmax_cross_entropy(p["class_logits"], t["cls"], reduction="none")
    else:
        probs = jax.nn.softmax(p["class_logits"], -1)
        cls_l = jnp.sum((probs - jax.nn.one_hot(t["cls"], num_classes, dtype=raw.dtype)) ** 2,
                        -1)
    total = (lambda_coord * jnp.sum(resp * coord, axis=(1, 2, 3))
             + jnp.sum(conf_loss, axis=(1, 2, 3)) + jnp.sum(obj * cls_l, axis=(1, 2)))
    return total


def yolo_detect(raw: jax.Array, *, num_classes: int, num_boxes: int = 2,
                score_threshold: float = 0.05, nms_threshold: float = 0.5,
                max_detections: int = 100) -> jax.Array:
    """Detections ``(N, max_detections, 6)`` rows ``(class, score, x0, y0, x1, y1)``
    (normalised, class ``-1`` padding): score = confidence x class probability for every box
    and class, boxes clipped to ``[0, 1]``, class-aware NMS."""
    p = yolo_decode(raw, num_classes, num_boxes)
    n = raw.shape[0]
    probs = jax.nn.softmax(p["class_logits"], -1)[..., None, :]  # (N, S, S, 1, K)
    scores = (p["confidence"][..., None] * probs).reshape(n, -1)
    boxes = jnp.clip(jnp.repeat(p["boxes"][..., None, :], num_classes, axis=-2), 0, 1)
    boxes = boxes.reshape(n, -1, 4)
    cls = jnp.broadcast_to(jnp.arange(num_classes), p["confidence"].shape + (num_classes,))
    cls = cls.reshape(n, -1)
    res = batched_nms(boxes, scores, cls, nms_threshold, max_outputs=max_detections,
                      valid=scores > score_threshold)
    i = jnp.maximum(res.indices, 0)
    take = jax.vmap(lambda a, j: a[j])
    rows = jnp.concatenate([take(cls, i)[..., None].astype(boxes.dtype),
                            take(scores, i)[..., None], take(boxes, i)], -1)
    return jnp.where((res.indices >= 0)[..., None], rows,
                     jnp.asarray([-1, 0, 0, 0, 0, 0], boxes.dtype))


def yolo(num_classes: int, *, backbone: Layer | None = None, num_boxes: int = 2) -> Layer:
    """Backbone + :func:`yolo_head` as one Layer: ``(N, H, W, 3)`` -> raw ``(N, S, S, B * 5 +
    K)`` (``S`` the backbone's output size; the default ResNet-18 trunk has stride 32: 7x7 for
    224x224). Train with ``loss=lambda raw, gt: yolo_loss(raw, gt, num_classes=K)``; detect
    with :func:`yolo_detect`."""
    if backbone is None:
        backbone, _ = resnet_trunk("resnet18", stage=4)
    head = yolo_head(num_classes, num_boxes)

    def init(key, in_shape):
        if len(in_shape) != 4:
            raise ShapeError("yolo", f"expected images (N, H, W, C), got {in_shape}")
        feat, p_b, s_b = init_child("backbone", backbone, child_key(key, 0), in_shape)
        out, p_h, _ = init_child("head", head, child_key(key, 1), feat)
        return out, {"backbone": p_b, "head": p_h}, ({"backbone": s_b} if s_b else {})

    def apply(params, state, x, *, key=None, train=False):
        f, s_b = apply_child("backbone", backbone, params["backbone"], state.get("backbone", {}),
                             x, key=child_key(key, 0), train=train)
        y, _ = apply_child("head", head, params["head"], {}, f)
        return y, ({**state, "backbone": s_b} if s_b else state)

    return Layer(init, apply, name="yolo", children=(("backbone", backbone), ("head", head)),
                 config={"num_classes": num_classes, "num_boxes": num_boxes})
