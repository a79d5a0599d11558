"""The book's TinySSD (d2l ch. 14.7): a single-shot multibox detector as one :class:`~fdl.nn.Layer`.

``tiny_ssd(num_classes)`` maps NHWC images ``(N, 256, 256, 3)`` to ``(anchors (A, 4),
cls_preds (N, A, num_classes + 1), bbox_preds (N, A * 4))`` — the book's ``TinySSD.forward``.
Five blocks: the base net (three down-sampling blocks, 16/32/64 channels), three more
down-sampling blocks of 128 channels, then a global max-pool; after each block a 3x3
convolution predicts the classes and another the box offsets of the
``len(sizes) + len(ratios) - 1`` anchors of every pixel (:data:`SIZES`, :data:`RATIOS`, the
book's table). For 256x256 inputs there are 5,444 anchors.

Params are named as the book's attributes (``blk_0`` ... ``blk_4``, ``cls_0`` ..., ``bbox_0``
...; inside a block ``"0"``, ``"1"``, ... as ``nn.Sequential`` numbers them), so a PyTorch
state dict of the book's model maps onto them one to one.

Training with :func:`fdl.train.fit`: ``fit(net, params, state, opt, (images, targets),
loss=ssd_loss, ...)`` where ``targets`` is the padded ground truth ``(N, max_objects, 5)``;
:func:`ssd_loss` runs :func:`multibox_target` inside the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdl import nn
from fdl.models.detection.anchors import (
    multibox_detection,
    multibox_prior,
    multibox_target,
    num_anchors_per_pixel,
)
from fdl.nn.core import Layer, ShapeError, apply_child, child_key, init_child

__all__ = [
    "SIZES",
    "RATIOS",
    "down_sample_blk",
    "base_net",
    "tiny_ssd",
    "make_ssd_loss",
    "ssd_loss",
    "ssd_metrics",
    "ssd_detect",
    "detections_to_list",
    "focal_loss",
]

SIZES = ((0.2, 0.272), (0.37, 0.447), (0.54, 0.619), (0.71, 0.79), (0.88, 0.961))
RATIOS = ((1.0, 2.0, 0.5),) * 5


def down_sample_blk(out_channels: int) -> Layer:
    """Two (3x3 conv, BatchNorm, ReLU) then a 2x2 max-pool: halves height and width."""
    return nn.serial(
        nn.conv2d(out_channels, 3, padding=1), nn.batch_norm(), nn.relu(),
        nn.conv2d(out_channels, 3, padding=1), nn.batch_norm(), nn.relu(),
        nn.max_pool2d(2),
    )


def base_net() -> Layer:
    """Three down-sampling blocks (16, 32, 64 channels): 256x256 -> 32x32."""
    return nn.serial(*[down_sample_blk(c) for c in (16, 32, 64)])


def _global_max_pool() -> Layer:
    def shape_fn(s):
        if len(s) != 4:
            raise ShapeError("global_max_pool2d", f"expected (N, H, W, C), got shape {s}")
        return (s[0], 1, 1, s[3])

    return nn.lambda_layer(lambda x: jnp.max(x, axis=(1, 2), keepdims=True),
                           name="global_max_pool2d", shape_fn=shape_fn)


def _blocks() -> list[Layer]:
    return [base_net(), down_sample_blk(128), down_sample_blk(128), down_sample_blk(128),
            _global_max_pool()]


def tiny_ssd(num_classes: int = 1, *, sizes: Sequence[Sequence[float]] = SIZES,
             ratios: Sequence[Sequence[float]] = RATIOS) -> Layer:
    """The book's TinySSD for ``num_classes`` object classes (background excluded).

    ``apply(params, state, x)`` with ``x`` ``(N, H, W, 3)`` returns ``((anchors (A, 4),
    cls_preds (N, A, num_classes + 1), bbox_preds (N, A * 4)), new_state)``; anchors are
    normalised corner boxes (a constant for a given input size).
    """
    nn.check_positive_int("tiny_ssd", "num_classes", num_classes)
    if len(sizes) != 5 or len(ratios) != 5:
        raise ValueError(f"tiny_ssd: sizes and ratios need one entry per scale (5), got "
                         f"{len(sizes)} and {len(ratios)}")
    per_pixel = {num_anchors_per_pixel(s, r) for s, r in zip(sizes, ratios, strict=True)}
    if len(per_pixel) != 1:
        raise ValueError("tiny_ssd: every scale needs the same number of anchors per pixel "
                         f"(len(sizes) + len(ratios) - 1), got {sorted(per_pixel)}")
    a = per_pixel.pop()
    children: list[tuple[str, Layer]] = []
    for i, blk in enumerate(_blocks()):
        children += [(f"blk_{i}", blk),
                     (f"cls_{i}", nn.conv2d(a * (num_classes + 1), 3, padding=1)),
                     (f"bbox_{i}", nn.conv2d(a * 4, 3, padding=1))]
    named = dict(children)

    def init(key, in_shape):
        if len(in_shape) != 4:
            raise ShapeError("tiny_ssd", f"expected images (N, H, W, C) (NHWC), got shape "
                                         f"{tuple(in_shape)}")
        params, state, shape, n_anchors = {}, {}, tuple(in_shape), 0
        for i in range(5):
            for j, name in enumerate((f"blk_{i}", f"cls_{i}", f"bbox_{i}")):
                out, p, s = init_child(name, named[name], child_key(key, 3 * i + j), shape)
                if p:
                    params[name] = p
                if s:
                    state[name] = s
                if j == 0:  # the predictors see this block's output
                    shape = out
                    n_anchors += out[1] * out[2] * a
        n = in_shape[0]
        return ((n_anchors, 4), (n, n_anchors, num_classes + 1), (n, n_anchors * 4)), params, state

    def apply(params, state, x, *, key=None, train=False):
        if jnp.ndim(x) != 4:
            raise ShapeError("tiny_ssd", f"expected images (N, H, W, C) (NHWC), got shape "
                                         f"{jnp.shape(x)}")
        new_state = dict(state)
        anchors, cls_preds, bbox_preds = [], [], []
        n = x.shape[0]
        for i in range(5):
            outs = []
            for j, name in enumerate((f"blk_{i}", f"cls_{i}", f"bbox_{i}")):
                y, s = apply_child(name, named[name], params.get(name, {}), state.get(name, {}),
                                   x, key=child_key(key, 3 * i + j), train=train)
                if s:
                    new_state[name] = s
                if j == 0:
                    x = y
                outs.append(y)
            anchors.append(multibox_prior(x.shape, sizes[i], ratios[i], x.dtype))
            cls_preds.append(outs[1].reshape(n, -1))
            bbox_preds.append(outs[2].reshape(n, -1))
        cls = jnp.concatenate(cls_preds, axis=1).reshape(n, -1, num_classes + 1)
        return (jnp.concatenate(anchors), cls, jnp.concatenate(bbox_preds, axis=1)), new_state

    return Layer(init, apply, name="tiny_ssd", children=tuple(children),
                 config={"num_classes": num_classes, "sizes": tuple(map(tuple, sizes)),
                         "ratios": tuple(map(tuple, ratios))})


# ----------------------------------------------------------------------------- loss


def focal_loss(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0,
               alpha: float | None = None) -> jax.Array:
    """Softmax focal loss (Lin et al. 2017) per position: ``-alpha_t (1 - p_t)^gamma log p_t``
    with ``p_t`` the probability of the true class; ``alpha`` (if given) weighs the foreground
    classes (label > 0) and ``1 - alpha`` the background. ``(..., C)`` logits, ``(...)`` int
    labels -> ``(...)``. ``gamma = 0`` without ``alpha`` is the cross-entropy."""
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma!r}")
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    logp_t = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = -((1 - jnp.exp(logp_t)) ** gamma) * logp_t
    if alpha is not None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal_loss: alpha must be in [0, 1], got {alpha!r}")
        loss = jnp.where(labels > 0, alpha, 1 - alpha) * loss
    return loss


_CLS = ("cross_entropy", "focal")
_BOX = ("l1", "smooth_l1")


def make_ssd_loss(*, cls_loss: str = "cross_entropy", box_loss: str = "l1",
                  focal_gamma: float = 2.0, focal_alpha: float | None = None,
                  smooth_l1_beta: float = 1.0, iou_threshold: float = 0.5,
                  box_weight: float = 1.0) -> Callable:
    """The SSD loss as ``loss(outputs, targets) -> (N,)`` for :func:`fdl.train.fit`.

    ``outputs`` is TinySSD's ``(anchors, cls_preds, bbox_preds)``, ``targets`` the padded
    ground truth ``(N, max_objects, 5)``. Per image: the mean over anchors of the class loss
    (``"cross_entropy"``, the book's, or ``"focal"``) plus ``box_weight`` times the mean over
    the ``A * 4`` offsets of the masked box loss (``"l1"``, the book's, or ``"smooth_l1"`` with
    ``smooth_l1_beta``), targets from :func:`multibox_target` at ``iou_threshold``.
    """
    if cls_loss not in _CLS:
        raise ValueError(f"make_ssd_loss: cls_loss must be one of {_CLS}, got {cls_loss!r}")
    if box_loss not in _BOX:
        raise ValueError(f"make_ssd_loss: box_loss must be one of {_BOX}, got {box_loss!r}")
    if smooth_l1_beta <= 0:
        raise ValueError(f"make_ssd_loss: smooth_l1_beta must be > 0, got {smooth_l1_beta!r}")

    def loss(outputs, targets):
        anchors, cls_preds, bbox_preds = outputs
        bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, targets,
                                                              iou_threshold=iou_threshold)
        if cls_loss == "focal":
            cls = focal_loss(cls_preds, cls_labels, gamma=focal_gamma, alpha=focal_alpha)
        else:
            cls = nn.losses.softmax_cross_entropy(cls_preds, cls_labels, reduction="none")
        d = bbox_preds * bbox_masks - bbox_labels * bbox_masks
        if box_loss == "l1":
            box = jnp.abs(d)
        else:
            a = jnp.abs(d)
            box = jnp.where(a < smooth_l1_beta, 0.5 * d * d / smooth_l1_beta,
                            a - 0.5 * smooth_l1_beta)
        return jnp.mean(cls, axis=1) + box_weight * jnp.mean(box, axis=1)

    return loss


ssd_loss = make_ssd_loss()
ssd_loss.__doc__ = "The book's SSD loss (cross-entropy + masked L1); see :func:`make_ssd_loss`."


def ssd_metrics(outputs, targets, iou_threshold: float = 0.5) -> dict[str, jax.Array]:
    """The book's ``cls_eval`` / ``bbox_eval`` as sums: ``{"cls_correct", "cls_count",
    "bbox_abs_err", "bbox_count"}``; class error = ``1 - cls_correct / cls_count``, bbox MAE
    = ``bbox_abs_err / bbox_count``."""
    anchors, cls_preds, bbox_preds = outputs
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, targets,
                                                          iou_threshold=iou_threshold)
    correct = jnp.sum(jnp.argmax(cls_preds, -1) == cls_labels)
    return {
        "cls_correct": correct.astype(jnp.float32),
        "cls_count": jnp.asarray(cls_labels.size, jnp.float32),
        "bbox_abs_err": jnp.sum(jnp.abs((bbox_labels - bbox_preds) * bbox_masks)),
        "bbox_count": jnp.asarray(bbox_labels.size, jnp.float32),
    }


def ssd_detect(model: Layer, params, state, images: jax.Array, *, nms_threshold: float = 0.5,
               pos_threshold: float = 0.009999999, class_aware: bool = False) -> jax.Array:
    """The book's ``predict``: evaluation-mode forward, softmax, :func:`multibox_detection`.
    ``(N, H, W, 3)`` -> ``(N, A, 6)`` rows ``(class, score, x0, y0, x1, y1)`` (normalised
    coordinates; class ``-1`` for suppressed or background rows). Jit it as a whole."""
    (anchors, cls_preds, bbox_preds), _ = model.apply(params, state, images, train=False)
    cls_probs = jax.nn.softmax(cls_preds, axis=-1).transpose(0, 2, 1)
    return multibox_detection(cls_probs, bbox_preds, anchors, nms_threshold=nms_threshold,
                              pos_threshold=pos_threshold, class_aware=class_aware)


def detections_to_list(output, score_threshold: float = 0.0) -> list[np.ndarray]:
    """Host-side: per image, the rows of :func:`multibox_detection`'s output with ``class >=
    0`` and ``score >= score_threshold`` (the book displays ``score >= 0.9``), as ``(k, 6)``
    NumPy arrays in decreasing score order."""
    out = np.asarray(output)
    if out.ndim != 3 or out.shape[-1] != 6:
        raise ValueError(f"detections_to_list: expected (batch, A, 6), got {out.shape}")
    keep = (out[..., 0] >= 0) & (out[..., 1] >= score_threshold)
    return [o[k] for o, k in zip(out, keep, strict=True)]
