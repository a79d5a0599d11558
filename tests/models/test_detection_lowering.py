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
