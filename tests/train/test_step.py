"""Step builders: metrics, masking, one compile, loss against a hand-written step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn, optim
from fdl.testing import count_compilations
from fdl.train import accuracy, make_eval_step, make_train_step, top_k_accuracy

from .helpers import blobs, init, tiny_mlp


def test_train_step_matches_manual_sgd():
    model = tiny_mlp(bn=False)
    params, state = init(model)
    x, y = blobs(12)
    opt = optim.sgd(0.1)
    step = make_train_step(model, opt, donate=False)

    def loss(p):
        logits, _ = model.apply(p, state, x)
        return nn.softmax_cross_entropy(logits, y)

    g = jax.grad(loss)(params)
    expected = jax.tree.map(lambda p, gi: p - 0.1 * gi, params, g)
    new_params, _, _, m = step(params, state, opt.init(params), (x, y), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    logits, _ = model.apply(params, state, x)
    np.testing.assert_allclose(m["loss"] / m["count"], loss(params), rtol=1e-5)
    assert float(m["count"]) == 12
    np.testing.assert_allclose(m["correct"] / 12, accuracy(logits, y), rtol=1e-6)


def test_padding_mask_equals_unpadded_batch():
    model = tiny_mlp(bn=False)
    params, state = init(model)
    x, y = blobs(10)
    opt = optim.sgd(0.5)
    step = make_train_step(model, opt, donate=False, top_k=(2,))
    p1, _, _, m1 = step(params, state, opt.init(params), (x[:7], y[:7]), jax.random.key(0))
    xp = np.concatenate([x[:7], x[:3]])
    yp = np.concatenate([y[:7], y[:3]])
    mask = np.array([1] * 7 + [0] * 3, np.float32)
    step2 = make_train_step(model, opt, donate=False, top_k=(2,))
    p2, _, _, m2 = step2(params, state, opt.init(params), (xp, yp, mask), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for k in ("loss", "count", "correct", "top2"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5)


def test_compiles_once_and_donates():
    model = tiny_mlp(dropout=0.5)
    params, state = init(model)
    x, y = blobs(8)
    opt = optim.adam(1e-2)
    step = make_train_step(model, opt)
    o = opt.init(params)
    p, s = params, state
    with count_compilations(step.call) as compiled:
        for i in range(3):
            p, s, o, m = step(p, s, o, (x, y), jax.random.key(i))
    assert len(compiled) == 1, compiled
    assert np.isfinite(float(m["loss"]))
    # dropout in training needs the key: different keys, different losses
    ev = make_eval_step(model)
    e1 = ev(p, s, (x, y))
    e2 = ev(p, s, (x, y))
    assert float(e1["loss"]) == float(e2["loss"])


def test_bn_state_updated_in_train_not_eval():
    model = tiny_mlp()
    params, state = init(model)
    x, y = blobs(8)
    opt = optim.sgd(0.0)
    step = make_train_step(model, opt, donate=False)
    _, new_state, _, _ = step(params, state, opt.init(params), (x, y), jax.random.key(0))
    assert not np.allclose(new_state["bn1"]["mean"], state["bn1"]["mean"])


def test_regression_loss_and_topk_helpers():
    model = nn.dense(1)
    _, params, state = model.init(jax.random.key(0), (1, 3))
    x = np.ones((4, 3), np.float32)
    yv = np.zeros((4, 1), np.float32)
    step = make_train_step(model, optim.sgd(0.1), "squared_error", donate=False)
    _, _, _, m = step(params, state, optim.sgd(0.1).init(params), (x, yv), jax.random.key(0))
    assert "correct" not in m and float(m["count"]) == 4
    logits = jnp.array([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06]])
    np.testing.assert_allclose(top_k_accuracy(logits, jnp.array([2, 1]), 2), 0.5)
    with pytest.raises(ValueError, match="unknown loss"):
        make_train_step(model, optim.sgd(0.1), "hinge-ish")
