"""Losses: PyTorch equality, float64 gradient checks, reductions/weights, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fdl import nn
from fdl.nn import losses as L
from fdl.testing import arrays, check_gradients

REDUCTIONS = ("none", "mean", "sum")
SHAPE = (3, 4)  # one shape for all gradient checks (shares compiled primitives)


def _rand(shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- PyTorch


@pytest.fixture(scope="module")
def T():
    return pytest.importorskip("torch")


def _t(a):
    import torch

    return torch.from_numpy(np.array(a))


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b,
                               rtol=rtol, atol=atol)


@pytest.mark.torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_integer_labels_vs_torch(T, reduction, smoothing):
    F = T.nn.functional
    logits = _rand((6, 5), scale=2.0)
    labels = np.random.default_rng(1).integers(0, 5, size=6)
    ours = L.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                   label_smoothing=smoothing, reduction=reduction)
    ref = F.cross_entropy(_t(logits), _t(labels), label_smoothing=smoothing, reduction=reduction)
    _close(ours, ref)


@pytest.mark.torch
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_probability_targets_vs_torch(T, smoothing):
    F = T.nn.functional
    logits = _rand((6, 5), scale=2.0)
    targets = _softmax(_rand((6, 5), seed=2))
    for reduction in REDUCTIONS:
        ours = L.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                       label_smoothing=smoothing, reduction=reduction)
        ref = F.cross_entropy(_t(logits), _t(targets), label_smoothing=smoothing,
                              reduction=reduction)
        _close(ours, ref)


@pytest.mark.torch
def test_cross_entropy_sequences_mask_and_axis_vs_torch(T):
    """(N, T, K) logits with a padding mask == torch's (N, K, T) with ignore_index."""
    F = T.nn.functional
    n, t, k = 3, 5, 7
    logits = _rand((n, t, k), scale=2.0)
    labels = np.random.default_rng(3).integers(0, k, size=(n, t))
    valid_lens = np.array([5, 2, 3])
    mask = (np.arange(t)[None] < valid_lens[:, None]).astype(np.float32)
    torch_labels = np.where(mask > 0, labels, -100)
    our_labels = np.where(mask > 0, labels, -1)  # out-of-range padding ids, weight 0
    tl = _t(np.moveaxis(logits, -1, 1))
    for smoothing in (0.0, 0.1):
        for reduction in REDUCTIONS:
            ours = L.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(our_labels),
                                           weights=jnp.asarray(mask), reduction=reduction,
                                           label_smoothing=smoothing)
            ref = F.cross_entropy(tl, _t(torch_labels), reduction=reduction,
                                  label_smoothing=smoothing)
            _close(ours, ref)
    # classes on axis 1 (PyTorch's layout) via axis=
    ours = L.softmax_cross_entropy(jnp.asarray(np.moveaxis(logits, -1, 1)), jnp.asarray(labels),
                                   axis=1, reduction="none")
    _close(ours, F.cross_entropy(tl, _t(labels), reduction="none"))


def test_d2l_masked_softmax_ce_recipe():
    """d2l's MaskedSoftmaxCELoss: per-sequence mean over *all* positions of mask * CE."""
    n, t, k = 2, 4, 6
    logits = _rand((n, t, k), seed=4)
    labels = np.random.default_rng(5).integers(0, k, size=(n, t))
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    d2l = (ce * mask).mean(axis=1)
    ours = L.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                   weights=jnp.asarray(mask), reduction="none").mean(axis=1)
    np.testing.assert_allclose(ours, d2l, rtol=1e-5)
    # reduction="mean" with weights averages over valid positions only
    mean = L.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                   weights=jnp.asarray(mask))
    np.testing.assert_allclose(mean, (ce * mask).sum() / mask.sum(), rtol=1e-5)
    # all-zero weights: 0, not NaN
    zero = L.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                   weights=jnp.zeros((n, t)))
    assert float(zero) == 0.0


@pytest.mark.torch
def test_sigmoid_bce_vs_torch(T):
    F = T.nn.functional
    logits = _rand((4, 3), scale=3.0)
    labels = np.random.default_rng(6).uniform(size=(4, 3)).astype(np.float32)
    w = np.random.default_rng(7).uniform(size=(4, 3)).astype(np.float32)
    for reduction in REDUCTIONS:
        ours = L.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                              reduction=reduction)
        _close(ours, F.binary_cross_entropy_with_logits(_t(logits), _t(labels),
                                                        reduction=reduction))
    for reduction in ("none", "sum"):  # torch's weighted "mean" is mean(w * l), ours sum/sum(w)
        ours = L.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                              weights=jnp.asarray(w), reduction=reduction)
        _close(ours, F.binary_cross_entropy_with_logits(_t(logits), _t(labels), weight=_t(w),
                                                        reduction=reduction))


@pytest.mark.torch
def test_regression_losses_vs_torch(T):
    F = T.nn.functional
    pred = _rand((5, 3), seed=8, scale=2.0)
    target = _rand((5, 3), seed=9, scale=2.0)
    p, t = jnp.asarray(pred), jnp.asarray(target)
    tp, tt = _t(pred), _t(target)
    for r in REDUCTIONS:
        _close(L.squared_error(p, t, reduction=r), F.mse_loss(tp, tt, reduction=r) / 2)
        _close(L.l1_loss(p, t, reduction=r), F.l1_loss(tp, tt, reduction=r))
        for delta in (1.0, 0.5, 2.5):
            _close(L.huber_loss(p, t, delta, reduction=r),
                   F.huber_loss(tp, tt, delta=delta, reduction=r))
        for beta in (1.0, 0.5, 0.0):
            _close(L.smooth_l1_loss(p, t, beta, reduction=r),
                   F.smooth_l1_loss(tp, tt, beta=beta, reduction=r))


@pytest.mark.torch
@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_multiclass_hinge_vs_torch(T, margin):
    F = T.nn.functional
    scores = _rand((6, 4), seed=10)
    labels = np.random.default_rng(11).integers(0, 4, size=6)
    for r in REDUCTIONS:
        ours = L.multiclass_hinge_loss(jnp.asarray(scores), jnp.asarray(labels), margin,
                                       reduction=r)
        _close(ours, F.multi_margin_loss(_t(scores), _t(labels), p=1, margin=margin,
                                         reduction=r))


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:reduction.*batchmean")
def test_kl_divergence_vs_torch(T):
    F = T.nn.functional
    log_p = np.log(_softmax(_rand((4, 5), seed=12)))
    target = _softmax(_rand((4, 5), seed=13))
    target[0, 1] = 0.0  # 0 * log 0 = 0
    for r in ("none", "mean", "sum", "batchmean"):
        ours = L.kl_divergence(jnp.asarray(log_p), jnp.asarray(target), reduction=r)
        _close(ours, F.kl_div(_t(log_p), _t(target), reduction=r))
        ours = L.kl_divergence(jnp.asarray(log_p), jnp.asarray(np.log(target + 1e-3)),
                               log_target=True, reduction=r)
        _close(ours, F.kl_div(_t(log_p), _t(np.log(target + 1e-3)), reduction=r,
                              log_target=True))
    # default is batchmean: the mean KL per example
    kl = (np.where(target > 0, target * np.log(np.where(target > 0, target, 1)), 0)
          - target * log_p).sum(1).mean()
    np.testing.assert_allclose(L.kl_divergence(jnp.asarray(log_p), jnp.asarray(target)), kl,
                               rtol=1e-5)


# ----------------------------------------------------------------------------- stability, dtypes


def test_numerical_stability_and_dtypes():
    big = jnp.asarray([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], jnp.float32)
    ce = L.softmax_cross_entropy(big, jnp.asarray([1, 0]), reduction="none")
    np.testing.assert_allclose(ce, [2e4, np.log(3.0)], rtol=1e-6)
    bce = L.sigmoid_binary_cross_entropy(big, jnp.zeros_like(big), reduction="none")
    assert np.all(np.isfinite(bce))
    np.testing.assert_allclose(bce[0], [1e4, 0.0, np.log(2.0)], rtol=1e-6)
    g = jax.grad(lambda x: L.softmax_cross_entropy(x, jnp.asarray([1, 0])))(big)
    assert np.all(np.isfinite(g))
    # half-precision logits are upcast: float32 loss
    lb = jnp.asarray(_rand((4, 3)), jnp.bfloat16)
    assert L.softmax_cross_entropy(lb, jnp.asarray([0, 1, 2, 0])).dtype == jnp.float32
    assert L.sigmoid_binary_cross_entropy(lb, jnp.ones((4, 3))).dtype == jnp.float32
    # exported from fdl.nn as well
    assert nn.softmax_cross_entropy is L.softmax_cross_entropy
    assert nn.losses is L


# ----------------------------------------------------------------------------- gradients


labels_st = st.lists(st.integers(0, SHAPE[-1] - 1), min_size=SHAPE[0], max_size=SHAPE[0])


@settings(max_examples=3)
@given(logits=arrays(SHAPE), labels=labels_st, smoothing=st.sampled_from([0.0, 0.2]))
def test_softmax_cross_entropy_gradients(logits, labels, smoothing):
    lab = jnp.asarray(labels)
    w = jnp.asarray([1.0, 0.0, 2.0])
    check_gradients(lambda x: L.softmax_cross_entropy(x, lab, label_smoothing=smoothing,
                                                      weights=w), (logits,), order=2)


@settings(max_examples=5, deadline=None)
@given(shape=st.sampled_from([(5,), (2, 3), (2, 3, 4)]), axis=st.integers(-1, 0),
       seed=st.integers(0, 2**16))
def test_label_nll_matches_log_softmax_to_second_order(shape, axis, seed):
    """label_nll's closed-form derivative (softmax - onehot, a custom JVP) equals autodiff of
    ``-take(log_softmax)``: values, gradients, jvp and a Hessian-vector product (float64)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        z = jnp.asarray(rng.normal(scale=3.0, size=shape))
        ax = axis % len(shape)
        labels = jnp.asarray(rng.integers(0, shape[ax], size=shape[:ax] + shape[ax + 1:]))
        w = jnp.asarray(rng.normal(size=labels.shape))

        def ref(x):
            logp = jax.nn.log_softmax(x, axis=ax)
            picked = jnp.take_along_axis(logp, jnp.expand_dims(labels, ax), axis=ax)
            return jnp.sum(-jnp.squeeze(picked, ax) * w)

        def new(x):
            return jnp.sum(L.label_nll(x, labels, ax) * w)

        v = jnp.asarray(rng.normal(size=shape))
        np.testing.assert_allclose(new(z), ref(z), rtol=1e-12)
        np.testing.assert_allclose(jax.grad(new)(z), jax.grad(ref)(z), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(jax.jvp(new, (z,), (v,))[1], jax.jvp(ref, (z,), (v,))[1],
                                   rtol=1e-10, atol=1e-12)
        hvp = jax.jvp(jax.grad(new), (z,), (v,))[1]
        np.testing.assert_allclose(hvp, jax.jvp(jax.grad(ref), (z,), (v,))[1], rtol=1e-9,
                                   atol=1e-12)


@settings(max_examples=3)
@given(logits=arrays(SHAPE), other=arrays(SHAPE))
def test_softmax_cross_entropy_probability_gradients(logits, other):
    targets = _softmax(other)
    check_gradients(lambda x, t: L.softmax_cross_entropy(x, t, label_smoothing=0.1,
                                                         reduction="sum"),
                    (logits, targets), order=2)


@settings(max_examples=3)
@given(logits=arrays(SHAPE, min_value=-4.0, max_value=4.0),
       labels=arrays(SHAPE, min_value=0.0, max_value=1.0))
def test_sigmoid_bce_gradients(logits, labels):
    check_gradients(lambda x, z: L.sigmoid_binary_cross_entropy(x, z, reduction="none"),
                    (logits, labels), order=2)


@settings(max_examples=3)
@given(target=arrays(SHAPE), d=arrays(SHAPE, min_value=-3.0, max_value=3.0,
                                      kinks=(-1.0, 0.0, 1.0), margin=0.05))
def test_regression_gradients(target, d):
    """Order-2 checks away from the kinks: 0 (L1), +-delta (Huber), +-beta (smooth L1)."""
    fns = [
        L.squared_error,
        L.l1_loss,
        lambda p, t, **kw: L.huber_loss(p, t, 1.0, **kw),
        lambda p, t, **kw: L.smooth_l1_loss(p, t, 1.0, **kw),
    ]
    for fn in fns:
        check_gradients(lambda p, t, fn=fn: fn(p, t, reduction="none"), (target + d, target),
                        order=2)


@settings(max_examples=3)
@given(scores=arrays(SHAPE), labels=labels_st)
def test_multiclass_hinge_gradients(scores, labels):
    lab = np.asarray(labels)
    true = np.take_along_axis(scores, lab[:, None], -1)
    active = 1.0 - true + scores
    active[np.arange(SHAPE[0]), lab] = 1.0  # the true class is excluded from the sum
    assume(np.abs(active).min() > 0.05)
    check_gradients(lambda s: L.multiclass_hinge_loss(s, jnp.asarray(lab), reduction="none"),
                    (scores,), order=2)


@settings(max_examples=3)
@given(a=arrays(SHAPE), b=arrays(SHAPE))
def test_kl_divergence_gradients(a, b):
    log_p = np.log(_softmax(a))
    target = _softmax(b)
    check_gradients(lambda lp, t: L.kl_divergence(lp, t, reduction="none"), (log_p, target),
                    order=2)


# ----------------------------------------------------------------------------- bad input


def test_invalid_reduction_lists_valid_values():
    x = jnp.ones((2, 3))
    calls = [
        lambda r: L.softmax_cross_entropy(x, jnp.asarray([0, 1]), reduction=r),
        lambda r: L.sigmoid_binary_cross_entropy(x, x, reduction=r),
        lambda r: L.squared_error(x, x, reduction=r),
        lambda r: L.l1_loss(x, x, reduction=r),
        lambda r: L.huber_loss(x, x, reduction=r),
        lambda r: L.smooth_l1_loss(x, x, reduction=r),
        lambda r: L.multiclass_hinge_loss(x, jnp.asarray([0, 1]), reduction=r),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'mean', 'sum', "
                                             r"got 'avg'"):
            call("avg")
    with pytest.raises(ValueError, match=r"'none', 'mean', 'sum', 'batchmean', got 'avg'"):
        L.kl_divergence(x, x, reduction="avg")


def test_shape_mismatches_name_both_shapes():
    with pytest.raises(ValueError, match=r"prediction shape \(4, 1\) and target shape \(4,\)"):
        L.squared_error(jnp.ones((4, 1)), jnp.ones(4))
    for fn in (L.l1_loss, L.huber_loss, L.smooth_l1_loss):
        with pytest.raises(ValueError, match=r"\(4, 1\).*\(4,\)"):
            fn(jnp.ones((4, 1)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"logits shape \(4, 1\) and labels shape \(4,\)"):
        L.sigmoid_binary_cross_entropy(jnp.ones((4, 1)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"log_predictions shape \(2, 3\) and targets shape"):
        L.kl_divergence(jnp.ones((2, 3)), jnp.ones((3, 2)))
    logits = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"integer labels of shape \(4, 1\) do not match logits "
                                         r"shape \(4, 3\)"):
        L.softmax_cross_entropy(logits, jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match="for probability targets pass a floating array"):
        L.softmax_cross_entropy(logits, jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"\(4,\) do not match logits shape \(4, 3\); these look "
                                         r"like class indices"):
        L.softmax_cross_entropy(logits, jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"labels shape \(4, 1\) does not match scores shape"):
        L.multiclass_hinge_loss(logits, jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match="integer class indices"):
        L.multiclass_hinge_loss(logits, jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"weights shape \(4, 2\) does not broadcast to the "
                                         r"per-example loss shape \(4,\)"):
        L.softmax_cross_entropy(logits, jnp.zeros(4, jnp.int32), weights=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"weights shape \(4, 1\) does not broadcast"):
        L.softmax_cross_entropy(logits, jnp.zeros(4, jnp.int32), weights=jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="class axis 2 is out of range"):
        L.softmax_cross_entropy(logits, jnp.zeros(4, jnp.int32), axis=2)
    with pytest.raises(ValueError, match="batchmean' needs a batch axis"):
        L.kl_divergence(jnp.asarray(0.0), jnp.asarray(1.0))


def test_bad_hyperparameters():
    x, lab = jnp.ones((2, 3)), jnp.asarray([0, 1])
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        L.softmax_cross_entropy(x, lab, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"delta must be a real number > 0.0, got 0"):
        L.huber_loss(x, x, 0)
    with pytest.raises(ValueError, match=r"beta must be a real number >= 0.0, got -1"):
        L.smooth_l1_loss(x, x, -1)
    with pytest.raises(ValueError, match=r"margin must be a real number >= 0.0"):
        L.multiclass_hinge_loss(x, lab, -0.5)
