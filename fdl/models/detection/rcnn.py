"""Two-stage detection (Faster R-CNN, d2l ch. 14.8): box coder, anchor grid, matcher, balanced
sampler, region proposal network, Fast R-CNN RoI head, their losses and the whole detector as
one :class:`~fdl.nn.Layer` on a ResNet trunk from the zoo. Everything runs under ``jit`` with
fixed sizes (proposals, sampled RoIs and detections are padded, with validity masks).

The pieces follow torchvision's ``torchvision.models.detection`` (``BoxCoder``,
``AnchorGenerator``, ``Matcher``, ``BalancedPositiveNegativeSampler``, ``RegionProposalNetwork``,
``RoIHeads``) in their defaults, with one documented difference: the losses are per image
(each image's sampled anchors/RoIs averaged on their own), so that :func:`fdl.train.fit` can
average them over a batch like any per-example loss; torchvision averages over the samples of
the whole batch (equal when every image has the same number of samples, the usual case).

Ground truth is ``(N, max_objects, 5)`` rows ``(class, x0, y0, x1, y1)`` in *pixels*, class
``-1`` for padding (the readers' targets times the image size: :func:`to_pixels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl import nn
from fdl.nn.core import Layer, ShapeError, apply_child, child_key, init_child
from fdl.ops.boxes import box_iou, clip_boxes
from fdl.ops.nms import batched_nms, nms
from fdl.ops.roi import roi_align

__all__ = [
    "encode_boxes",
    "decode_boxes",
    "grid_anchors",
    "match_boxes",
    "sample_balanced",
    "rpn_head",
    "rpn_proposals",
    "rpn_targets",
    "rpn_loss",
    "roi_box_head",
    "sample_rois",
    "fast_rcnn_loss",
    "postprocess_detections",
    "resnet_trunk",
    "faster_rcnn",
    "faster_rcnn_loss",
    "to_pixels",
    "check_ground_truth",
]

BBOX_CLIP = math.log(1000.0 / 16)
BELOW, BETWEEN = -1, -2


# ----------------------------------------------------------------------------- boxes


def encode_boxes(boxes: jax.Array, reference: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Deltas of ``boxes`` from ``reference`` boxes (torchvision's ``BoxCoder.encode``):
    ``(wx * dx / w_r, wy * dy / h_r, ww * log(w / w_r), wh * log(h / h_r))``, ``(..., 4)``."""
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    gw = boxes[..., 2] - boxes[..., 0]
    gh = boxes[..., 3] - boxes[..., 1]
    gx = boxes[..., 0] + 0.5 * gw
    gy = boxes[..., 1] + 0.5 * gh
    return jnp.stack([wx * (gx - rx) / rw, wy * (gy - ry) / rh, ww * jnp.log(gw / rw),
                      wh * jnp.log(gh / rh)], axis=-1)


def decode_boxes(deltas: jax.Array, reference: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_CLIP) -> jax.Array:
    """Boxes from deltas (torchvision's ``BoxCoder.decode_single``; ``dw``, ``dh`` clamped at
    ``clip`` = log(1000/16)): ``(..., 4)`` deltas and reference boxes -> ``(..., 4)``."""
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    cx, cy = dx * rw + rx, dy * rh + ry
    half_w, half_h = 0.5 * jnp.exp(dw) * rw, 0.5 * jnp.exp(dh) * rh
    return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def grid_anchors(feature_hw: Sequence[int], stride: int | Sequence[int],
                 sizes: Sequence[float] = (32, 64, 128, 256, 512),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> jax.Array:
    """torchvision's ``AnchorGenerator`` for one feature map: base anchors ``round([-w, -h,
    w, h] / 2)`` for every (ratio, size) (``h / w = ratio``, area ``size^2``), shifted to
    ``(x * stride_w, y * stride_h)`` of every cell. ``(H * W * len(ratios) * len(sizes), 4)``
    pixel corners ordered by cell (row-major), then ratio, then size. NumPy: a constant."""
    h, w = (int(v) for v in feature_hw)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    scales = np.asarray(sizes, np.float32)
    r = np.asarray(ratios, np.float32)
    h_ratios = np.sqrt(r)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2)
    sx = np.arange(w, dtype=np.float32) * sw
    sy = np.arange(h, dtype=np.float32) * sh
    yy, xx = np.meshgrid(sy, sx, indexing="ij")
    shifts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], axis=1)
    return jnp.asarray((shifts[:, None, :] + base[None]).reshape(-1, 4).astype(np.float32))


def check_ground_truth(layer: str, gt, batch: int | None = None) -> None:
    """Raise :class:`~fdl.nn.core.ShapeError` unless ``gt`` is ``(N, max_objects, 5)`` rows
    ``(class, x0, y0, x1, y1)`` (with ``N == batch`` when given). Shapes only: works under
    ``jit``; the values are checked eagerly by :func:`fdl.ops.check_boxes` and the readers."""
    shape = tuple(getattr(gt, "shape", ()))
    if len(shape) != 3 or shape[-1] != 5:
        raise ShapeError(layer, f"expected ground truth (N, max_objects, 5) rows (class, x0, y0, "
                                f"x1, y1), got shape {shape}")
    if batch is not None and shape[0] != batch:
        raise ShapeError(layer, f"expected ground truth for {batch} images (N, max_objects, 5), "
                                f"got shape {shape}")


def to_pixels(targets, size: Sequence[int]) -> np.ndarray:
    """Normalised ground truth ``(N, M, 5)`` (the readers' layout) -> pixel corners for an
    image of ``size = (height, width)``; padding rows stay ``-1``."""
    t = np.array(targets, np.float32, copy=True)
    real = t[..., 0] >= 0
    h, w = size
    t[..., [1, 3]] = np.where(real[..., None], t[..., [1, 3]] * w, -1)
    t[..., [2, 4]] = np.where(real[..., None], t[..., [2, 4]] * h, -1)
    return t


# ----------------------------------------------------------------------------- matching


def match_boxes(iou: jax.Array, valid: jax.Array, high: float, low: float,
                allow_low_quality: bool = False) -> jax.Array:
    """torchvision's ``Matcher``: ``iou`` ``(M, N)`` (ground truth x candidates), ``valid``
    ``(M,)`` -> ``(N,)`` int32, the matched ground truth, ``BELOW`` (-1) for IoU ``< low``,
    ``BETWEEN`` (-2) for ``low <= IoU < high``. ``allow_low_quality``: every candidate whose
    IoU with some box equals that box's best IoU keeps its match (ties included); a box that
    overlaps no candidate at all (best IoU 0) restores nothing (torchvision would then restore
    every candidate with IoU 0 to its argmax). Candidates with no valid box are ``BELOW``."""
    iou = jnp.where(valid[:, None], iou, -1.0)
    vals = jnp.max(iou, axis=0)
    matches = jnp.argmax(iou, axis=0).astype(jnp.int32)
    out = jnp.where(vals < low, BELOW, jnp.where(vals < high, BETWEEN, matches))
    if allow_low_quality:
        best = jnp.max(iou, axis=1, keepdims=True)  # (M, 1)
        hit = jnp.any((iou == best) & valid[:, None] & (best > 0), axis=0)
        out = jnp.where(hit, matches, out)
    return jnp.where(jnp.any(valid), out, BELOW)


def sample_balanced(key, labels: jax.Array, batch_size: int, positive_fraction: float
                    ) -> tuple[jax.Array, jax.Array]:
    """torchvision's ``BalancedPositiveNegativeSampler`` for one image: ``labels`` ``(N,)``
    (1 positive, 0 negative, -1 ignored) -> ``(positive, negative)`` bool masks with
    ``min(#pos, int(batch_size * positive_fraction))`` positives and up to ``batch_size``
    in all, drawn uniformly at random."""
    pos, neg = labels == 1, labels == 0
    n_pos = jnp.minimum(jnp.sum(pos), int(batch_size * positive_fraction))
    n_neg = jnp.minimum(jnp.sum(neg), batch_size - n_pos)
    kp, kn = jax.random.split(key)

    def pick(k, mask, count):
        r = jnp.where(mask, jax.random.uniform(k, mask.shape), 2.0)
        rank = jnp.argsort(jnp.argsort(r))
        return mask & (rank < count)

    return pick(kp, pos, n_pos), pick(kn, neg, n_neg)


# ----------------------------------------------------------------------------- RPN


def rpn_head(num_anchors: int) -> Layer:
    """torchvision's ``RPNHead``: 3x3 conv (as many channels as the input) + ReLU, then 1x1
    convolutions to ``num_anchors`` objectness logits and ``4 * num_anchors`` deltas (weights
    N(0, 0.01), zero biases). ``(N, H, W, C)`` -> ``(logits (N, H * W * A), deltas (N, H * W *
    A, 4))`` in :func:`grid_anchors`' order. Params ``conv``, ``cls_logits``, ``bbox_pred``."""
    nn.check_positive_int("rpn_head", "num_anchors", num_anchors)
    init_w = nn.initializers.normal(0.01)

    def layers(c: int) -> dict[str, Layer]:  # the input's channel count sizes the 3x3 conv
        return {"conv": nn.conv2d(c, 3, padding=1, w_init=init_w),
                "cls_logits": nn.conv2d(num_anchors, 1, w_init=init_w),
                "bbox_pred": nn.conv2d(4 * num_anchors, 1, w_init=init_w)}

    def init(key, in_shape):
        if len(in_shape) != 4:
            raise ShapeError("rpn_head", f"expected features (N, H, W, C), got {in_shape}")
        params, shape = {}, tuple(in_shape)
        for i, (name, layer) in enumerate(layers(in_shape[-1]).items()):
            out, params[name], _ = init_child(name, layer, child_key(key, i), shape)
            shape = out if name == "conv" else shape
        n, h, w, _ = in_shape
        a = h * w * num_anchors
        return ((n, a), (n, a, 4)), params, {}

    def apply(params, state, x, *, key=None, train=False):
        ls = layers(params["conv"]["w"].shape[-1])
        t = jax.nn.relu(apply_child("conv", ls["conv"], params["conv"], {}, x)[0])
        logits, _ = apply_child("cls_logits", ls["cls_logits"], params["cls_logits"], {}, t)
        deltas, _ = apply_child("bbox_pred", ls["bbox_pred"], params["bbox_pred"], {}, t)
        n = x.shape[0]
        return (logits.reshape(n, -1), deltas.reshape(n, -1, 4)), state

    return Layer(init, apply, name="rpn_head", config={"num_anchors": num_anchors})


def rpn_proposals(anchors: jax.Array, logits: jax.Array, deltas: jax.Array,
                  image_hw: Sequence[int], *, pre_nms_top_n: int = 2000,
                  post_nms_top_n: int = 1000, nms_threshold: float = 0.7,
                  min_size: float = 1e-3, score_threshold: float = 0.0
                  ) -> tuple[jax.Array, jax.Array]:
    """torchvision's ``RegionProposalNetwork.filter_proposals`` (one feature level): decode,
    keep the ``pre_nms_top_n`` best by objectness, clip to the image, drop boxes smaller than
    ``min_size`` or scoring ``< score_threshold`` (sigmoid), NMS, keep ``post_nms_top_n``.
    ``(A, 4)`` anchors, ``(N, A)`` logits, ``(N, A, 4)`` deltas -> ``(boxes (N, P, 4),
    valid (N, P))`` with ``P = post_nms_top_n``, best first. Not differentiated."""
    logits, deltas = lax.stop_gradient(logits), lax.stop_gradient(deltas)
    k = min(pre_nms_top_n, anchors.shape[0])

    def one(lg, dl):
        top, idx = lax.top_k(lg, k)
        boxes = clip_boxes(decode_boxes(dl[idx], anchors[idx]), image_hw)
        wh = boxes[:, 2:] - boxes[:, :2]
        ok = (wh[:, 0] >= min_size) & (wh[:, 1] >= min_size)
        ok = ok & (jax.nn.sigmoid(top) >= score_threshold)
        res = nms(boxes, top, nms_threshold, max_outputs=post_nms_top_n, valid=ok)
        keep = res.indices >= 0
        return jnp.where(keep[:, None], boxes[jnp.maximum(res.indices, 0)], 0.0), keep

    return jax.vmap(one)(logits, deltas)


def rpn_targets(key, anchors: jax.Array, gt: jax.Array, *, fg_iou: float = 0.7,
                bg_iou: float = 0.3, batch_size_per_image: int = 256,
                positive_fraction: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per image: anchors matched to ground truth (high/low quality as torchvision's RPN) and
    sampled. ``gt`` ``(N, M, 5)`` pixel rows -> ``(labels (N, A) float 1/0, sampled (N, A)
    bool, box_targets (N, A, 4))`` (deltas of the matched boxes, weights 1)."""
    check_ground_truth("rpn_targets", gt)

    def one(k, g):
        valid = g[:, 0] >= 0
        matches = match_boxes(box_iou(g[:, 1:], anchors), valid, fg_iou, bg_iou,
                              allow_low_quality=True)
        labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW, 0, -1))
        pos, neg = sample_balanced(k, labels, batch_size_per_image, positive_fraction)
        targets = encode_boxes(g[jnp.maximum(matches, 0), 1:], anchors)
        return (labels == 1).astype(anchors.dtype), pos | neg, jnp.where(
            (matches >= 0)[:, None], targets, 0.0)

    keys = jax.random.split(key, gt.shape[0])
    return jax.vmap(one)(keys, lax.stop_gradient(gt))


def _smooth_l1(d, beta):
    a = jnp.abs(d)
    return jnp.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)


def rpn_loss(logits, deltas, labels, sampled, box_targets, *, beta: float = 1 / 9):
    """Per image: BCE of the sampled anchors' objectness (mean over the sampled) and smooth-L1
    (``beta`` 1/9, summed) of the positive anchors' deltas divided by the number sampled
    (torchvision's ``compute_loss``). ``(N,)``."""
    n_s = jnp.maximum(jnp.sum(sampled, axis=1), 1)
    bce = nn.losses.sigmoid_binary_cross_entropy(logits, labels, reduction="none")
    obj = jnp.sum(jnp.where(sampled, bce, 0.0), axis=1) / n_s
    pos = sampled & (labels > 0)
    box = jnp.sum(jnp.where(pos[..., None], _smooth_l1(deltas - box_targets, beta), 0.0),
                  axis=(1, 2)) / n_s
    return obj + box


# ----------------------------------------------------------------------------- RoI head


def roi_box_head(num_classes: int, hidden: int = 1024) -> Layer:
    """torchvision's ``TwoMLPHead`` + ``FastRCNNPredictor``: flatten, ``fc6``/``fc7`` (dense +
    ReLU), then ``cls_score`` (``num_classes + 1`` logits, background 0) and ``bbox_pred``
    (class-specific deltas). ``(R, h, w, C)`` -> ``(logits (R, K), deltas (R, K, 4))``."""
    nn.check_positive_int("roi_box_head", "num_classes", num_classes)
    k = num_classes + 1
    mlp = nn.serial(nn.flatten(), ("fc6", nn.dense(hidden)), nn.relu(), ("fc7", nn.dense(hidden)),
                    nn.relu())
    out = nn.parallel(("cls_score", nn.dense(k)), ("bbox_pred", nn.dense(4 * k)), combine="tuple")
    body = nn.serial(("mlp", mlp), ("predictor", out))

    def apply(params, state, x, *, key=None, train=False):
        (logits, deltas), state = body.apply(params, state, x, key=key, train=train)
        return (logits, deltas.reshape(deltas.shape[0], k, 4)), state

    def init(key, in_shape):
        (ls, ds), params, state = body.init(key, in_shape)
        return (ls, (ds[0], k, 4)), params, state

    return Layer(init, apply, name="roi_box_head", children=body.children,
                 config={"num_classes": num_classes, "hidden": hidden})


def sample_rois(key, proposals: jax.Array, valid: jax.Array, gt: jax.Array, *,
                fg_iou: float = 0.5, bg_iou: float = 0.5, batch_size_per_image: int = 512,
                positive_fraction: float = 0.25, weights=(10.0, 10.0, 5.0, 5.0)):
    """torchvision's ``RoIHeads.select_training_samples``: the ground-truth boxes are added to
    the proposals, matched (``>= fg_iou`` foreground, ``< bg_iou`` background) and sampled.
    ``(N, P, 4)`` proposals with ``(N, P)`` validity, ``(N, M, 5)`` pixel ground truth ->
    ``(rois (N, S, 4), sampled (N, S), labels (N, S) int32, box_targets (N, S, 4))`` with
    ``S = min(P + M, batch_size_per_image)`` slots (sampled first)."""
    check_ground_truth("sample_rois", gt, proposals.shape[0])
    s = min(proposals.shape[1] + gt.shape[1], batch_size_per_image)

    def one(k, props, ok, g):
        gvalid = g[:, 0] >= 0
        cand = jnp.concatenate([props, g[:, 1:]], axis=0)
        cand_ok = jnp.concatenate([ok, gvalid])
        matches = match_boxes(box_iou(g[:, 1:], cand), gvalid, fg_iou, bg_iou)
        lab = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW, 0, -1))
        lab = jnp.where(cand_ok, lab, -1)
        pos, neg = sample_balanced(k, lab, batch_size_per_image, positive_fraction)
        chosen = pos | neg
        order = jnp.argsort(~chosen, stable=True)[:s]  # the sampled first, by index
        m = jnp.maximum(matches[order], 0)
        labels = jnp.where(pos[order], g[m, 0].astype(jnp.int32) + 1, 0)
        targets = encode_boxes(g[m, 1:], cand[order], weights)
        targets = jnp.where(pos[order][:, None], targets, 0.0)
        return cand[order], chosen[order], labels, targets

    keys = jax.random.split(key, gt.shape[0])
    return jax.vmap(one)(keys, lax.stop_gradient(proposals), valid, lax.stop_gradient(gt))


def fast_rcnn_loss(logits, deltas, labels, sampled, box_targets, *, beta: float = 1 / 9):
    """Per image: cross-entropy over the sampled RoIs (mean) plus smooth-L1 (``beta`` 1/9,
    summed) of the true class's deltas of the foreground RoIs divided by the number sampled
    (torchvision's ``fastrcnn_loss``). ``logits (N, S, K)``, ``deltas (N, S, K, 4)`` ->
    ``(N,)``."""
    n_s = jnp.maximum(jnp.sum(sampled, axis=1), 1)
    ce = nn.losses.softmax_cross_entropy(logits, labels, reduction="none")
    cls = jnp.sum(jnp.where(sampled, ce, 0.0), axis=1) / n_s
    d = jnp.take_along_axis(deltas, labels[..., None, None], axis=2)[..., 0, :]
    fg = sampled & (labels > 0)
    box = jnp.sum(jnp.where(fg[..., None], _smooth_l1(d - box_targets, beta), 0.0),
                  axis=(1, 2)) / n_s
    return cls + box


def postprocess_detections(logits, deltas, rois, valid, image_hw, *, score_threshold=0.05,
                           nms_threshold=0.5, detections_per_image=100, min_size=1e-2,
                           weights=(10.0, 10.0, 5.0, 5.0)) -> jax.Array:
    """torchvision's ``RoIHeads.postprocess_detections``: per class, softmax scores and
    class-specific boxes clipped to the image; boxes scoring ``<= score_threshold`` or smaller
    than ``min_size`` dropped; class-aware NMS; the best ``detections_per_image``.
    ``(N, R, K)``, ``(N, R, K, 4)``, ``(N, R, 4)``, ``(N, R)`` -> ``(N, D, 6)`` rows ``(class,
    score, x0, y0, x1, y1)`` (pixels; class 0 is the first object class) padded with
    class ``-1``."""
    n, r, k = logits.shape

    def one(lg, dl, ro, ok):
        probs = jax.nn.softmax(lg, -1)[:, 1:]  # (R, K-1)
        boxes = clip_boxes(decode_boxes(dl[:, 1:], ro[:, None, :], weights), image_hw)
        boxes = boxes.reshape(-1, 4)
        scores = probs.reshape(-1)
        cls = jnp.tile(jnp.arange(k - 1), r)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (jnp.repeat(ok, k - 1) & (scores > score_threshold) & (wh[:, 0] >= min_size)
                & (wh[:, 1] >= min_size))
        res = batched_nms(boxes, scores, cls, nms_threshold, max_outputs=detections_per_image,
                          valid=keep)
        i = jnp.maximum(res.indices, 0)
        real = res.indices >= 0
        rows = jnp.concatenate([cls[i][:, None].astype(boxes.dtype), scores[i][:, None],
                                boxes[i]], axis=1)
        return jnp.where(real[:, None], rows, jnp.asarray([-1, 0, 0, 0, 0, 0], boxes.dtype))

    return jax.vmap(one)(lax.stop_gradient(logits), lax.stop_gradient(deltas), rois, valid)


# ----------------------------------------------------------------------------- the detector


def resnet_trunk(name: str = "resnet18", *, stage: int = 4, **kw) -> tuple[Layer, int]:
    """A zoo ResNet's ``features`` up to ``layer<stage>`` (no pooling, no head) and its stride:
    ``(trunk, stride)``. Param names are the zoo's (``conv1``, ``bn1``, ``layer1``...), so
    weights imported with :mod:`fdl.interop.torchvision` (``params["features"]``) fit."""
    from fdl.models import vision

    if stage not in (1, 2, 3, 4):
        raise ValueError(f"resnet_trunk: stage must be 1..4, got {stage!r}")
    model = getattr(vision, name)(**kw)
    features = dict(model.children)["features"]
    keep = []
    for child_name, child in features.children:
        keep.append((child_name, child))
        if child_name == f"layer{stage}":
            break
    small = kw.get("small_input", False)
    return nn.serial(*keep), (1 if small else 4) * 2 ** (stage - 1)


def faster_rcnn(num_classes: int, *, backbone: Layer | None = None, stride: int = 16,
                anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
                anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), roi_size: int = 7,
                rpn_pre_nms_top_n_train: int = 2000, rpn_post_nms_top_n_train: int = 2000,
                rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_test: int = 1000,
                rpn_nms_threshold: float = 0.7, rpn_batch_size_per_image: int = 256,
                box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                box_score_threshold: float = 0.05, box_nms_threshold: float = 0.5,
                detections_per_image: int = 100, hidden: int = 1024) -> Layer:
    """Faster R-CNN (one feature level, torchvision's defaults) as a Layer.

    ``backbone`` (default: ResNet-18 up to ``layer3``, stride 16) maps ``(N, H, W, 3)`` to
    features of stride ``stride``. Children: ``backbone``, ``rpn`` (:func:`rpn_head`),
    ``roi_head`` (:func:`roi_box_head`).

    - ``apply(params, state, images, train=False)`` -> detections ``(N, D, 6)`` rows ``(class,
      score, x0, y0, x1, y1)`` in pixels (class ``-1`` padding): :func:`postprocess_detections`.
    - ``apply(params, state, (images, gt), key=key, train=True)`` with pixel ground truth
      ``(N, M, 5)`` -> the training outputs ``{"rpn": (logits, deltas, labels, sampled,
      targets), "roi": (logits, deltas, labels, sampled, targets)}`` (proposals, matching and
      sampling inside, with ``key``) for :func:`faster_rcnn_loss`. With :func:`fdl.train.fit`:
      ``x = (images, gt)``, ``y = gt``, ``loss=faster_rcnn_loss``.

    BatchNorm in the backbone follows ``train``; detection usually freezes it (e.g.
    ``backbone=nn.frozen(trunk)`` for a pretrained trunk).
    """
    if backbone is None:
        backbone, stride = resnet_trunk("resnet18", stage=3)
    a = len(anchor_sizes) * len(anchor_ratios)
    rpn = rpn_head(a)
    head = roi_box_head(num_classes, hidden)
    children = (("backbone", backbone), ("rpn", rpn), ("roi_head", head))

    def init(key, in_shape):
        img_shape = in_shape[0] if isinstance(in_shape[0], tuple) else in_shape
        if len(img_shape) != 4:
            raise ShapeError("faster_rcnn", f"expected images (N, H, W, C), got {img_shape}")
        feat, p_b, s_b = init_child("backbone", backbone, child_key(key, 0), img_shape)
        _, p_r, _ = init_child("rpn", rpn, child_key(key, 1), feat)
        _, p_h, s_h = init_child("roi_head", head, child_key(key, 2),
                                 (1, roi_size, roi_size, feat[-1]))
        params = {"backbone": p_b, "rpn": p_r, "roi_head": p_h}
        state = {k: v for k, v in (("backbone", s_b), ("roi_head", s_h)) if v}
        n = img_shape[0]
        return (n, detections_per_image, 6), params, state

    def apply(params, state, x, *, key=None, train=False):
        images, gt = (x if isinstance(x, (tuple, list)) else (x, None))
        if train and gt is None:
            raise ValueError("faster_rcnn: training needs x = (images, ground_truth)")
        if getattr(images, "ndim", None) != 4:
            raise ShapeError("faster_rcnn", f"expected images (N, H, W, C), got shape "
                                            f"{tuple(getattr(images, 'shape', ()))}")
        if train:
            nn.require_key("faster_rcnn", key)
            check_ground_truth("faster_rcnn", gt, images.shape[0])
        hw = images.shape[1:3]
        feats, s_b = apply_child("backbone", backbone, params["backbone"],
                                 state.get("backbone", {}), images, key=child_key(key, 0),
                                 train=train)
        new_state = dict(state)
        if s_b:
            new_state["backbone"] = s_b
        (logits, deltas), _ = apply_child("rpn", rpn, params["rpn"], {}, feats)
        anchors = grid_anchors(feats.shape[1:3], stride, anchor_sizes, anchor_ratios)
        pre, post = ((rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train) if train
                     else (rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test))
        props, ok = rpn_proposals(anchors, logits, deltas, hw, pre_nms_top_n=pre,
                                  post_nms_top_n=post, nms_threshold=rpn_nms_threshold)
        boxes = props
        if train:
            k_rpn, k_roi = jax.random.split(jax.random.fold_in(key, 1))
            rpn_out = (logits, deltas, *rpn_targets(k_rpn, anchors, gt,
                                                    batch_size_per_image=rpn_batch_size_per_image))
            boxes, ok, labels, targets = sample_rois(
                k_roi, props, ok, gt, batch_size_per_image=box_batch_size_per_image,
                positive_fraction=box_positive_fraction)
        n, r = boxes.shape[:2]
        pooled = roi_align(feats, boxes.reshape(-1, 4), roi_size,
                           box_indices=jnp.repeat(jnp.arange(n), r), spatial_scale=1.0 / stride,
                           sampling_ratio=2)
        (cls, dl), s_h = apply_child("roi_head", head, params["roi_head"],
                                     state.get("roi_head", {}), pooled, key=child_key(key, 2),
                                     train=train)
        cls, dl = cls.reshape(n, r, -1), dl.reshape(n, r, -1, 4)
        if s_h:
            new_state["roi_head"] = s_h
        if train:
            return {"rpn": rpn_out, "roi": (cls, dl, labels, ok, targets)}, new_state
        return postprocess_detections(cls, dl, boxes, ok, hw,
                                      score_threshold=box_score_threshold,
                                      nms_threshold=box_nms_threshold,
                                      detections_per_image=detections_per_image), new_state

    return Layer(init, apply, name="faster_rcnn", children=children,
                 config={"num_classes": num_classes, "stride": stride,
                         "anchor_sizes": tuple(anchor_sizes),
                         "anchor_ratios": tuple(anchor_ratios)})


def faster_rcnn_loss(outputs, targets=None) -> jax.Array:
    """Per image: :func:`rpn_loss` + :func:`fast_rcnn_loss` of :func:`faster_rcnn`'s training
    outputs (``targets`` unused: the matching happened inside the model). ``(N,)``."""
    return rpn_loss(*outputs["rpn"]) + fast_rcnn_loss(*outputs["roi"])
