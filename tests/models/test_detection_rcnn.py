"""Faster R-CNN pieces against torchvision (recorded: BoxCoder, Matcher, AnchorGenerator),
the sampler, proposals, loss gradients in float64, and the whole detector (train/eval, a few
optimisation steps)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl import optim
from fdl.models.detection import rcnn as R
from fdl.nn.core import ShapeError

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ops",
                      "torchvision_golden.npz")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def test_box_coder_equals_torchvision(golden):
    w = (10.0, 10.0, 5.0, 5.0)
    enc = R.encode_boxes(golden["coder_gt"], golden["coder_proposals"], w)
    np.testing.assert_allclose(np.asarray(enc), golden["coder_encoded"], rtol=1e-5, atol=1e-5)
    dec = R.decode_boxes(golden["coder_deltas"], golden["coder_proposals"], w)
    np.testing.assert_allclose(np.asarray(dec), golden["coder_decoded"], rtol=1e-5, atol=1e-3)


@settings(max_examples=10)
@given(st.integers(0, 2**31 - 1))
def test_encode_decode_round_trip(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (20, 2))
    ref = np.concatenate([xy, xy + rng.uniform(5, 50, (20, 2))], 1)
    xy = rng.uniform(0, 100, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 50, (20, 2))], 1)
    back = R.decode_boxes(R.encode_boxes(boxes, ref, (10, 10, 5, 5)), ref, (10, 10, 5, 5))
    np.testing.assert_allclose(np.asarray(back), boxes, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_equals_torchvision(golden, low_quality):
    iou = golden["matcher_iou"]
    got = R.match_boxes(jnp.asarray(iou), jnp.ones(len(iou), bool), 0.7, 0.3, low_quality)
    np.testing.assert_array_equal(np.asarray(got), golden[f"matcher_{int(low_quality)}"])
    # padding rows take no part
    padded = np.concatenate([iou, np.ones((2, iou.shape[1]), np.float32)])
    valid = np.arange(len(padded)) < len(iou)
    got = R.match_boxes(jnp.asarray(padded), jnp.asarray(valid), 0.7, 0.3, low_quality)
    np.testing.assert_array_equal(np.asarray(got), golden[f"matcher_{int(low_quality)}"])


def test_anchor_grid_equals_torchvision(golden):
    got = R.grid_anchors((6, 8), 16, (32, 64, 128), (0.5, 1.0, 2.0))
    np.testing.assert_array_equal(np.asarray(got), golden["anchors_6x8_stride16"])


_sample = jax.jit(R.sample_balanced, static_argnums=(2, 3))


def test_rpn_proposals_equal_torchvision(golden):
    """RegionProposalNetwork.filter_proposals (eval: top 100, clip, min size, NMS 0.7, 40)."""
    anchors = jnp.asarray(golden["anchors_6x8_stride16"])
    boxes, valid = jax.jit(lambda lg, d: R.rpn_proposals(
        anchors, lg, d, (96, 128), pre_nms_top_n=100, post_nms_top_n=40, nms_threshold=0.7))(
        golden["rpn_logits"], golden["rpn_deltas"])
    np.testing.assert_array_equal(np.asarray(valid).sum(1), golden["rpn_count"])
    for i, c in enumerate(golden["rpn_count"]):
        np.testing.assert_allclose(np.asarray(boxes[i, :c]), golden["rpn_boxes"][i, :c],
                                   rtol=1e-5, atol=1e-4)


def test_postprocess_detections_equal_torchvision(golden):
    """RoIHeads.postprocess_detections (score > 0.05, min size 1e-2, per-class NMS 0.5, 20)."""
    n, r = golden["post_logits"].shape[:2]
    det = jax.jit(lambda lg, d, ro: R.postprocess_detections(
        lg, d.reshape(n, r, -1, 4), ro, jnp.ones((n, r), bool), (96, 128),
        detections_per_image=20))(golden["post_logits"], golden["post_deltas"],
                                  golden["post_rois"])
    np.testing.assert_array_equal(np.asarray(det[..., 0] >= 0).sum(1), golden["post_count"])
    np.testing.assert_allclose(np.asarray(det), golden["post_rows"], rtol=1e-5, atol=1e-4)


def test_sampler_counts():
    labels = jnp.asarray(np.r_[np.ones(30), np.zeros(500), -np.ones(20)].astype(np.int32))
    pos, neg = _sample(jax.random.key(0), labels, 256, 0.5)
    assert int(pos.sum()) == 30 and int(neg.sum()) == 226
    assert not (pos & (labels != 1)).any() and not (neg & (labels != 0)).any()
    pos2, _ = _sample(jax.random.key(1), jnp.ones(400, jnp.int32), 256, 0.5)
    assert int(pos2.sum()) == 128
    assert not np.array_equal(np.asarray(pos2), np.asarray(
        _sample(jax.random.key(2), jnp.ones(400, jnp.int32), 256, 0.5)[0]))


@pytest.mark.slow  # properties; test_rpn_proposals_equal_torchvision covers the same path
def test_proposals_are_clipped_sorted_and_suppressed():
    rng = np.random.default_rng(0)
    anchors = R.grid_anchors((4, 4), 16, (16, 32), (0.5, 1.0, 2.0))
    a = anchors.shape[0]
    logits = jnp.asarray(rng.normal(size=(2, a)), jnp.float32)
    deltas = jnp.asarray(rng.normal(0, 0.3, (2, a, 4)), jnp.float32)
    boxes, valid = jax.jit(lambda lg, d: R.rpn_proposals(
        anchors, lg, d, (64, 64), pre_nms_top_n=50, post_nms_top_n=30, nms_threshold=0.5))(
        logits, deltas)
    assert boxes.shape == (2, 30, 4) and valid.shape == (2, 30)
    b = np.asarray(boxes)[np.asarray(valid)]
    assert b.min() >= 0 and b[:, [0, 2]].max() <= 64 and b[:, [1, 3]].max() <= 64
    from fdl.ops import box_iou

    for i in range(2):
        kept = np.asarray(boxes[i])[np.asarray(valid[i])]
        iou = np.array(box_iou(kept, kept))
        np.fill_diagonal(iou, 0)
        assert iou.max() <= 0.5


def test_losses_gradients_float64():
    rng = np.random.default_rng(1)
    n, a, s, k = 2, 12, 6, 3
    labels = jnp.asarray(rng.integers(0, 2, (n, a)), jnp.float64)
    sampled = jnp.asarray(rng.uniform(size=(n, a)) < 0.7)
    tgt = jnp.asarray(rng.normal(size=(n, a, 4)))
    # deltas far from the smooth-L1 kink at |d| = 1/9
    d0 = tgt + jnp.asarray(rng.uniform(0.3, 0.6, (n, a, 4)) * rng.choice([-1, 1], (n, a, 4)))
    cls = jnp.asarray(rng.integers(0, k, (n, s)), jnp.int32)
    tgt2 = jnp.asarray(rng.normal(size=(n, s, 4)))
    d1 = jnp.asarray(rng.normal(size=(n, s, k, 4)))
    d1 = d1.at[jnp.arange(n)[:, None], jnp.arange(s)[None], cls].set(
        tgt2 + 0.5)  # the true class's deltas away from the kink
    # both losses in one function (one compilation); weights keep the terms apart
    fn = jax.jit(lambda lg, d, lg2, d2: jnp.sum(R.rpn_loss(lg, d, labels, sampled, tgt))
                 + 0.7 * jnp.sum(R.fast_rcnn_loss(lg2, d2, cls, sampled[:, :s], tgt2)))
    ft.check_gradients(fn, (jnp.asarray(rng.normal(size=(n, a))), d0,
                            jnp.asarray(rng.normal(size=(n, s, k))), d1), order=1,
                       dense_check_max_size=0)


def _tiny_detector():
    return R.faster_rcnn(2, backbone=_tiny_backbone(), stride=8, anchor_sizes=(16, 32),
                         anchor_ratios=(0.5, 1.0, 2.0), rpn_pre_nms_top_n_train=200,
                         rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                         rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
                         box_batch_size_per_image=32, detections_per_image=10, hidden=32,
                         roi_size=4)


def _tiny_backbone():
    from fdl import nn

    return nn.serial(nn.conv2d(8, 3, stride=2, padding=1), nn.relu(),
                     nn.conv2d(16, 3, stride=2, padding=1), nn.relu(),
                     nn.conv2d(16, 3, stride=2, padding=1), nn.relu())


def test_faster_rcnn_shapes_by_tracing():
    net = _tiny_detector()
    shape = (2, 64, 64, 3)
    params, state = jax.eval_shape(lambda k: net.init_params(k, shape), jax.random.key(0))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    gt = jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)

    def train_loss(p, s, x, gt):
        out, _ = net.apply(p, s, (x, gt), key=jax.random.key(0), train=True)
        return R.faster_rcnn_loss(out, gt), out

    loss, out = jax.eval_shape(train_loss, params, state, x, gt)
    assert loss.shape == (2,)
    assert out["roi"][0].shape == (2, 32, 3) and out["roi"][1].shape == (2, 32, 3, 4)
    det, _ = jax.eval_shape(lambda p, s, x: net.apply(p, s, x), params, state, x)
    assert det.shape == (2, 10, 6)


@pytest.mark.slow  # ~22 s CPU of compilation; the pieces are tested one by one above
def test_faster_rcnn_trains_and_detects():
    net = _tiny_detector()
    shape = (2, 64, 64, 3)
    params, state = jax.jit(net.init_params, static_argnums=1)(jax.random.key(0), shape)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(0, 0.2, shape), jnp.float32)
    x = x.at[0, 8:32, 10:40].set(1.0).at[1, 30:60, 20:44].set(1.0)
    gt = jnp.asarray([[[0, 10, 8, 40, 32], [-1] * 5], [[1, 20, 30, 44, 60], [-1] * 5]],
                     jnp.float32)
    opt = optim.sgd(0.01, momentum=0.9)

    @jax.jit
    def step(p, s, o, k):
        def loss(pp):
            out, s2 = net.apply(pp, s, (x, gt), key=k, train=True)
            return jnp.mean(R.faster_rcnn_loss(out, gt)), s2

        (value, s2), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = opt.update(g, o, p)
        return optim.apply_updates(p, u), s2, o, value

    o = opt.init(params)
    losses = []
    for i in range(8):
        params, state, o, value = step(params, state, o, jax.random.key(i))
        losses.append(float(value))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    det, _ = jax.jit(lambda p, s, im: net.apply(p, s, im))(params, state, x)
    assert det.shape == (2, 10, 6)
    d = np.asarray(det)
    real = d[..., 0] >= 0
    assert np.all((d[real][:, 0] < 2) & (d[real][:, 1] > 0.05))
    assert np.all(d[real][:, 2:] >= 0) and np.all(d[real][:, 2:] <= 64)


def test_resnet_trunk_names_and_stride():
    trunk, stride = R.resnet_trunk("resnet18", stage=3)
    assert stride == 16
    holder = {}

    def run(k):
        holder["out"], p, s = trunk.init(k, (1, 64, 64, 3))
        return p, s

    jax.eval_shape(run, jax.random.key(0))
    assert tuple(holder["out"]) == (1, 4, 4, 256)
    names = [n for n, _ in trunk.children]
    assert names[:3] == ["conv1", "bn1", "maxpool"] and names[-1] == "layer3"


def test_bad_shapes_are_refused():
    net = _tiny_detector()
    shape = (2, 64, 64, 3)
    params, state = jax.eval_shape(lambda k: net.init_params(k, shape), jax.random.key(0))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)

    def train(gt, images=x):
        return jax.eval_shape(lambda p, s, im, g: net.apply(p, s, (im, g), key=jax.random.key(0),
                                                            train=True), params, state, images, gt)

    with pytest.raises(ShapeError, match=r"faster_rcnn.*\(N, max_objects, 5\).*\(2, 3, 4\)"):
        train(jax.ShapeDtypeStruct((2, 3, 4), jnp.float32))
    with pytest.raises(ShapeError, match=r"for 2 images.*\(3, 1, 5\)"):
        train(jax.ShapeDtypeStruct((3, 1, 5), jnp.float32))
    with pytest.raises(ShapeError, match=r"images \(N, H, W, C\).*\(64, 64, 3\)"):
        train(jax.ShapeDtypeStruct((2, 1, 5), jnp.float32), jax.ShapeDtypeStruct(shape[1:],
                                                                                 jnp.float32))
    with pytest.raises(ValueError, match="ground_truth"):
        jax.eval_shape(lambda p, s, im: net.apply(p, s, im, key=jax.random.key(0), train=True),
                       params, state, x)
    with pytest.raises(ShapeError, match="rpn_targets"):
        R.rpn_targets(jax.random.key(0), jnp.zeros((5, 4)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="stage"):
        R.resnet_trunk("resnet18", stage=5)


def test_to_pixels():
    t = np.array([[[0, 0.5, 0.25, 1.0, 0.5], [-1, -1, -1, -1, -1]]], np.float32)
    np.testing.assert_array_equal(R.to_pixels(t, (40, 80)),
                                  [[[0, 40, 10, 80, 20], [-1, -1, -1, -1, -1]]])
