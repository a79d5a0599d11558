"""Labels out of range are never silently clamped: a ValueError on concrete arrays, NaN under
jit, a checkify check with ``check_labels``; padding positions (weight 0) may hold anything."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from fdl.nn import losses as L

LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(4, 10)), jnp.float32)


@pytest.mark.parametrize("bad", [12, 10, -1])
def test_cross_entropy_refuses_out_of_range_labels_eagerly(bad):
    labels = jnp.array([1, 2, bad, 3])
    with pytest.raises(ValueError, match=rf"label {bad} at index 2 is out of range.*< 10"):
        L.softmax_cross_entropy(LOGITS, labels)
    with pytest.raises(ValueError, match="out of range"):
        L.softmax_cross_entropy(LOGITS, np.asarray(labels), reduction="none")


def test_cross_entropy_label_smoothing_and_sequences():
    with pytest.raises(ValueError, match="out of range"):
        L.softmax_cross_entropy(LOGITS, jnp.array([1, 2, 99, 3]), label_smoothing=0.1)
    logits = jnp.zeros((2, 3, 5))
    labels = jnp.array([[0, 1, 2], [3, 5, 4]])
    with pytest.raises(ValueError, match=r"label 5 at index \(1, 1\)"):
        L.softmax_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="label 3 at index"):  # classes on axis 1 (3 of them)
        L.softmax_cross_entropy(jnp.zeros((2, 3, 5)), jnp.array([[0, 1, 2, 0, 3]] * 2), axis=1)


def test_padding_positions_of_weight_zero_may_hold_any_label():
    labels = jnp.array([1, 2, -100, 3])
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    got = L.softmax_cross_entropy(LOGITS, labels, weights=mask)
    keep = jnp.array([0, 1, 3])
    want = L.softmax_cross_entropy(LOGITS[keep], labels[keep])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jitted = jax.jit(lambda x, y, w: L.softmax_cross_entropy(x, y, weights=w))
    np.testing.assert_allclose(jitted(LOGITS, labels, mask), want, rtol=1e-6)
    grads = jax.jit(jax.grad(lambda x: L.softmax_cross_entropy(x, labels, weights=mask)))(LOGITS)
    assert np.isfinite(np.asarray(grads)).all()
    np.testing.assert_array_equal(grads[2], 0.0)


def test_under_jit_an_out_of_range_label_gives_nan_not_another_class():
    f = jax.jit(L.softmax_cross_entropy)
    assert np.isnan(f(LOGITS, jnp.array([1, 2, 12, 3])))
    per = jax.jit(lambda x, y: L.softmax_cross_entropy(x, y, reduction="none"))(
        LOGITS, jnp.array([1, 2, 12, 3]))
    assert np.isnan(per[2]) and np.isfinite(per[jnp.array([0, 1, 3])]).all()
    assert np.isfinite(f(LOGITS, jnp.array([1, 2, 9, 3])))


def test_hinge_and_binary_cross_entropy():
    with pytest.raises(ValueError, match="label 3 at index 1 is out of range"):
        L.multiclass_hinge_loss(jnp.zeros((2, 3)), jnp.array([0, 3]))
    assert np.isnan(jax.jit(L.multiclass_hinge_loss)(jnp.zeros((2, 3)), jnp.array([0, 3])))
    with pytest.raises(ValueError, match=r"label 2.0 at index 0 .*\[0, 1\]"):
        L.sigmoid_binary_cross_entropy(jnp.zeros(3), jnp.array([2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="label -1 at index 1"):
        L.sigmoid_binary_cross_entropy(jnp.zeros(2), jnp.array([0, -1]))
    assert np.isnan(jax.jit(L.sigmoid_binary_cross_entropy)(jnp.zeros(2), jnp.array([0.0, 2.0])))
    ok = L.sigmoid_binary_cross_entropy(jnp.zeros(2), jnp.array([0.3, 2.0]),
                                        weights=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(ok, np.log(2.0), rtol=1e-6)


def test_check_labels_eager_and_under_checkify():
    with pytest.raises(ValueError, match="label 10 at index 1"):
        L.check_labels(jnp.array([0, 10]), 10)
    L.check_labels(jnp.array([0, 10]), 10, weights=jnp.array([1, 0]))  # padding: fine

    def step(x, y):
        L.check_labels(y, 10)
        return L.softmax_cross_entropy(x, y)

    checked = jax.jit(checkify.checkify(step))
    err, _ = checked(LOGITS, jnp.array([1, 2, 3, 4]))
    err.throw()
    err, _ = checked(LOGITS, jnp.array([1, 2, 30, 4]))
    with pytest.raises(checkify.JaxRuntimeError, match="out of range"):
        err.throw()
