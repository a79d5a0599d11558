"""Detection steps lower for GPU and TPU (``jax.export`` with platforms=("cuda", "tpu"); no
accelerator needed): TinySSD's training step (multibox_target inside), NMS-based detection,
RoI align/pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import ops, optim, train
from fdl.models import detection as D


def _export(fn, *args):
    exp = jax.export.export(jax.jit(fn), platforms=("cuda", "tpu"))(*args)
    assert set(exp.platforms) == {"cuda", "tpu"}
    return exp


@pytest.mark.slow  # ~20 s of tracing; the RoI/NMS lowering below runs by default
def test_tiny_ssd_training_step_and_detection_lower():
    net = D.tiny_ssd(2)
    params, state = jax.jit(net.init_params, static_argnums=1)(jax.random.key(0),
                                                               (2, 64, 64, 3))
    opt = optim.sgd(0.2, weight_decay=5e-4)
    step = train.make_train_step(net, opt, D.ssd_loss, jit=False)
    x = jnp.zeros((2, 64, 64, 3))
    y = jnp.asarray(np.tile([[[0, 0.1, 0.1, 0.5, 0.5], [-1, -1, -1, -1, -1]]], (2, 1, 1)),
                    jnp.float32)
    _export(step, params, state, opt.init(params), (x, y), jax.random.key(1))
    _export(lambda p, s, im: D.ssd_detect(net, p, s, im), params, state, x)


def test_roi_ops_lower():
    f = jnp.zeros((2, 8, 8, 4))
    b = jnp.array([[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 7.0, 6.0]])
    i = jnp.array([0, 1])
    _export(lambda f, b, i: ops.roi_align(f, b, 2, box_indices=i, sampling_ratio=2,
                                          aligned=True), f, b, i)
    _export(lambda f, b, i: ops.roi_pool(f, b, 2, box_indices=i), f, b, i)
    _export(lambda b, s: ops.batched_nms(b, s, jnp.array([0, 1]), 0.5, max_outputs=2),
            b, jnp.array([0.9, 0.8]))


@pytest.mark.slow  # ~30 s of tracing
def test_faster_rcnn_and_yolo_lower():
    from fdl import nn

    backbone = nn.serial(nn.conv2d(8, 3, stride=4, padding=1), nn.relu())
    net = D.faster_rcnn(1, backbone=backbone, stride=4, anchor_sizes=(8, 16),
                        rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                        rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
                        box_batch_size_per_image=16, detections_per_image=8, hidden=16,
                        roi_size=2)
    params, state = jax.jit(net.init_params, static_argnums=1)(jax.random.key(0),
                                                               (1, 32, 32, 3))
    x = jnp.zeros((1, 32, 32, 3))
    gt = jnp.asarray([[[0, 2, 2, 20, 20]]], jnp.float32)

    def train_loss(p, s, x, gt, k):
        out, _ = net.apply(p, s, (x, gt), key=k, train=True)
        return jnp.mean(D.faster_rcnn_loss(out, gt))

    _export(jax.grad(train_loss), params, state, x, gt, jax.random.key(1))
    _export(lambda p, s, x: net.apply(p, s, x)[0], params, state, x)
    raw = jnp.zeros((1, 4, 4, 13))
    _export(lambda r: D.yolo_detect(r, num_classes=3), raw)
    _export(jax.grad(lambda r: jnp.sum(D.yolo_loss(r, gt / 32, num_classes=3))), raw)
