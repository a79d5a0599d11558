"""The YOLO-style head: grid targets, float64 loss gradients, fitting raw predictions to the
ground truth recovers the boxes, detection output, the model's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.testing as ft
from fdl.models import detection as Y  # the package (its `yolo` is the model function)
from fdl.nn.core import ShapeError

GT = np.array([[[0, 0.1, 0.1, 0.4, 0.5], [2, 0.5, 0.5, 0.9, 0.8], [1, 0.15, 0.12, 0.3, 0.4]],
               [[1, 0.0, 0.0, 1.0, 1.0], [-1] * 5, [-1] * 5]], np.float32)


def test_targets_pick_the_centre_cell_and_the_later_object():
    targets = jax.jit(Y.yolo_targets, static_argnums=1)
    t = targets(jnp.asarray(GT), (4, 4))
    obj = np.asarray(t["object"])
    assert obj[0].sum() == 3 and obj[1].sum() == 1
    # centres: (0.25, 0.3) -> row 1 col 1; (0.7, 0.65) -> row 2 col 2; (0.225, 0.26) -> (1, 0)
    assert obj[0, 1, 1] and obj[0, 2, 2] and obj[0, 1, 0] and obj[1, 2, 2]
    assert np.asarray(t["cls"])[0, 1, 0] == 1 and np.asarray(t["cls"])[0, 2, 2] == 2
    two = np.array([[[0, 0.1, 0.1, 0.3, 0.3], [1, 0.12, 0.12, 0.28, 0.28]]], np.float32)
    t2 = targets(jnp.asarray(two), (2, 2))
    assert int(np.asarray(t2["object"]).sum()) == 1 and int(t2["cls"][0, 0, 0]) == 1


def test_loss_gradients_float64():
    # conf_target="one": with the default the IoU is a constant target (stop_gradient), so the
    # loss's derivative through it is deliberately not the autodiff gradient
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.normal(size=(2, 3, 3, 2 * 5 + 3)))
    gt = jnp.asarray(GT, jnp.float64)

    def fn(r):  # both class losses in one compilation, weighted apart
        se, ce = (jnp.sum(Y.yolo_loss(r, gt, num_classes=3, class_loss=cl, conf_target="one"))
                  for cl in ("squared_error", "cross_entropy"))
        return se + 0.3 * ce

    ft.check_gradients(jax.jit(fn), (raw,), order=1, dense_check_max_size=0)


_detect = jax.jit(lambda r: Y.yolo_detect(r, num_classes=3, max_detections=7))


@pytest.mark.slow  # ~2 s CPU of compilation; targets, gradients and decoding are tested apart
def test_fitting_raw_predictions_recovers_the_boxes():
    gt = jnp.asarray(GT[:1, :2])
    raw = jnp.zeros((1, 4, 4, 2 * 5 + 3))
    loss = jax.jit(jax.value_and_grad(lambda r: jnp.sum(Y.yolo_loss(r, gt, num_classes=3))))

    @jax.jit
    def run(r):
        def body(_, r):
            return r - 0.5 * loss(r)[1]
        return jax.lax.fori_loop(0, 400, body, r)

    first = float(loss(raw)[0])
    raw = run(raw)
    assert float(loss(raw)[0]) < 0.05 * first
    det = np.asarray(_detect(raw))[0][:5]
    top = det[det[:, 1] > 0.5]
    assert sorted(top[:, 0].tolist()) == [0, 2]
    for row in top:
        g = GT[0][GT[0][:, 0] == row[0]][0]
        np.testing.assert_allclose(row[2:], g[1:], atol=0.03)


def test_detection_rows_and_model_shapes():
    rng = np.random.default_rng(1)
    raw = jnp.asarray(rng.normal(size=(2, 4, 4, 13)), jnp.float32)
    det = np.asarray(_detect(raw))
    assert det.shape == (2, 7, 6)
    real = det[..., 0] >= 0
    assert np.all(det[real][:, 2:] >= 0) and np.all(det[real][:, 2:] <= 1)
    assert np.all(np.diff(det[0][real[0]][:, 1]) <= 0)  # decreasing scores
    from fdl import nn

    net = Y.yolo(3, backbone=nn.serial(nn.conv2d(4, 3, stride=4, padding=1), nn.relu()))
    holder = {}

    def run(k):
        holder["out"], p, s = net.init(k, (2, 32, 32, 3))
        return p, s

    params, state = jax.eval_shape(run, jax.random.key(0))
    assert tuple(holder["out"]) == (2, 8, 8, 13)
    assert set(params) == {"backbone", "head"} and params["head"]["w"].shape == (1, 1, 4, 13)
    out, _ = jax.eval_shape(net.apply, params, state, jax.ShapeDtypeStruct((2, 32, 32, 3),
                                                                           jnp.float32))
    assert out.shape == (2, 8, 8, 13)
    with pytest.raises(ShapeError, match="yolo"):
        net.init(jax.random.key(0), (32, 32, 3))
    with pytest.raises(ValueError, match="channels"):
        Y.yolo_loss(raw, jnp.asarray(GT), num_classes=4)
    with pytest.raises(ShapeError, match=r"yolo_loss.*\(N, max_objects, 5\).*\(2, 3, 4\)"):
        Y.yolo_loss(raw, jnp.asarray(GT[..., :4]), num_classes=3)
    with pytest.raises(ShapeError, match=r"for 2 images.*\(1, 3, 5\)"):
        Y.yolo_loss(raw, jnp.asarray(GT[:1]), num_classes=3)
    with pytest.raises(ShapeError, match="raw predictions"):
        Y.yolo_detect(raw[0], num_classes=3)
    with pytest.raises(ValueError, match="class_loss"):
        Y.yolo_loss(raw, jnp.asarray(GT), num_classes=3, class_loss="hinge")
