"""Attention core: masks, masked softmax, dot-product / additive / multi-head attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl.nn.attention import (
    additive_attention,
    additive_attention_apply,
    causal_mask,
    combine_masks,
    dot_product_attention,
    mask_fill_value,
    masked_softmax,
    padding_mask,
)
from fdl.nn.core import ShapeError
from fdl.nn.multi_head import multi_head_attention


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_masked_softmax_1d_valid_lens():
    x = np.random.default_rng(0).normal(size=(2, 2, 4))
    w = np.asarray(masked_softmax(jnp.asarray(x), jnp.array([2, 3])))
    np.testing.assert_allclose(w[0, :, :2], np_softmax(x[0, :, :2]), rtol=1e-12)
    np.testing.assert_allclose(w[1, :, :3], np_softmax(x[1, :, :3]), rtol=1e-12)
    assert (w[0, :, 2:] == 0).all() and (w[1, :, 3:] == 0).all()


def test_masked_softmax_2d_valid_lens():
    x = np.random.default_rng(1).normal(size=(2, 2, 4))
    vl = np.array([[1, 3], [2, 4]])
    w = np.asarray(masked_softmax(jnp.asarray(x), jnp.asarray(vl)))
    for b in range(2):
        for q in range(2):
            n = vl[b, q]
            np.testing.assert_allclose(w[b, q, :n], np_softmax(x[b, q, :n]), rtol=1e-12)
            assert (w[b, q, n:] == 0).all()
    np.testing.assert_allclose(w.sum(-1), 1.0)


def test_masked_softmax_d2l_example_and_none():
    # d2l: masked_softmax(torch.rand(2, 2, 4), torch.tensor([2, 3])) keeps 2 / 3 columns
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 2, 4)), jnp.float32)
    w = masked_softmax(x, jnp.array([2, 3]))
    assert w.dtype == jnp.float32
    assert (np.asarray(w[0, :, 2:]) == 0).all() and (np.asarray(w[1, :, 3:]) == 0).all()
    np.testing.assert_allclose(masked_softmax(x), jax.nn.softmax(x, -1), rtol=1e-6)


def test_masked_softmax_heads_axis_broadcasts():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 2, 5)))  # (B, H, Q, K)
    w = masked_softmax(x, jnp.array([1, 4]))
    assert (np.asarray(w[0, ..., 1:]) == 0).all() and (np.asarray(w[1, ..., 4:]) == 0).all()
    w2 = masked_softmax(x, jnp.array([[1, 2], [4, 5]]))
    assert (np.asarray(w2[0, :, 1, 2:]) == 0).all() and float(w2[1, 0, 1, 4]) > 0


def test_fully_masked_row_is_zero_with_finite_gradient():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 4)))
    w = masked_softmax(x, jnp.array([0, 2]))
    assert (np.asarray(w[0]) == 0).all()
    np.testing.assert_allclose(w[1].sum(-1), 1.0)
    g = jax.grad(lambda s: jnp.sum(masked_softmax(s, jnp.array([0, 2])) ** 2))(x)
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g[0]) == 0).all()
    # through attention: the output of a fully masked query is the zero vector
    q, k, v = (jnp.ones((1, 2, 3)), jnp.ones((1, 4, 3)), jnp.ones((1, 4, 5)))
    m = jnp.array([[[False] * 4, [True, False, False, False]]])
    out, wts = dot_product_attention(q, k, v, mask=m)
    assert (np.asarray(out[0, 0]) == 0).all() and (np.asarray(wts[0, 0]) == 0).all()
    np.testing.assert_allclose(out[0, 1], 1.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_mask_fill_depends_on_dtype(dtype):
    assert mask_fill_value(dtype) == jnp.finfo(dtype).min
    # large scores: a -1e6 fill would not mask in float16, ours does
    x = jnp.array([[[10.0, -10.0, 300.0]]], dtype)
    w = masked_softmax(x, jnp.array([2]))
    assert w.dtype == dtype
    assert float(w[0, 0, 2]) == 0.0
    np.testing.assert_allclose(np.asarray(w[0, 0, :2], np.float32), [1.0, 0.0], atol=1e-3)


def test_masked_softmax_bad_valid_lens_shape():
    with pytest.raises(ShapeError):
        masked_softmax(jnp.zeros((2, 3, 4)), jnp.array([1, 2, 3]))
    with pytest.raises(ShapeError):
        masked_softmax(jnp.zeros((2, 3, 4)), jnp.ones((2, 4), jnp.int32))


def test_mask_helpers():
    np.testing.assert_array_equal(padding_mask(jnp.array([0, 2]), 3),
                                  [[False, False, False], [True, True, False]])
    np.testing.assert_array_equal(causal_mask(3), np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(causal_mask(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])
    m = combine_masks(None, causal_mask(3), padding_mask(jnp.array([2]), 3)[:, None, :])
    np.testing.assert_array_equal(m[0], np.tril(np.ones((3, 3), bool)) & [True, True, False])
    assert combine_masks(None, None) is None


def test_dot_product_attention_matches_numpy():
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
    out, w = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    ref_w = np_softmax(q @ k.transpose(0, 2, 1) / 2.0)
    np.testing.assert_allclose(w, ref_w, rtol=1e-10)
    np.testing.assert_allclose(out, ref_w @ v, rtol=1e-10)
    assert out.shape == (2, 3, 6) and w.shape == (2, 3, 5)


def test_dot_product_attention_shape_errors_and_dropout():
    with pytest.raises(ShapeError):
        dot_product_attention(jnp.ones((1, 2, 3)), jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)))
    with pytest.raises(ShapeError):
        dot_product_attention(jnp.ones((1, 2, 3)), jnp.ones((1, 4, 3)), jnp.ones((1, 5, 2)))
    q = jnp.ones((1, 2, 3))
    with pytest.raises(ValueError, match="key"):
        dot_product_attention(q, q, q, dropout_rate=0.5, train=True)
    out_eval, _ = dot_product_attention(q, q, q, dropout_rate=0.5)
    out_tr, w = dot_product_attention(q, q, q, dropout_rate=0.5, key=jax.random.key(0),
                                      train=True)
    np.testing.assert_allclose(w, 0.5)  # returned weights are before dropout
    assert not np.allclose(out_tr, out_eval)


@settings(max_examples=3)
@given(data=st.data())
def test_dot_product_attention_gradients(data):
    q_len, k_len = 2, 3
    q = data.draw(ft.arrays((2, q_len, 3)))
    k = data.draw(ft.arrays((2, k_len, 3)))
    v = data.draw(ft.arrays((2, k_len, 2)))
    vl = data.draw(st.lists(st.integers(1, k_len), min_size=2, max_size=2))
    mask = padding_mask(jnp.array(vl), k_len)[:, None, :]

    def f(q, k, v):
        return dot_product_attention(q, k, v, mask=mask)[0]

    ft.check_gradients(f, (q, k, v), order=2, modes=("rev",), dense_check_max_size=0)


def test_causal_attention_has_no_gradient_to_future():
    rng = np.random.default_rng(6)
    t = 5
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, 4))) for _ in range(3))
    m = causal_mask(t)
    for i in range(t):
        def out_i(k, v, i=i):
            return jnp.sum(dot_product_attention(q, k, v, mask=m)[0][0, i])

        gk, gv = jax.grad(out_i, argnums=(0, 1))(k, v)
        assert (np.asarray(gk[0, i + 1:]) == 0).all() and (np.asarray(gv[0, i + 1:]) == 0).all()
        if i > 0:
            assert np.abs(np.asarray(gv[0, : i + 1])).min() > 0
    # self-attention: output i does not depend on inputs after i
    def self_attn(x, i):
        return jnp.sum(dot_product_attention(x, x, x, mask=m)[0][0, i])

    x = jnp.asarray(rng.normal(size=(1, t, 4)))
    for i in range(t):
        g = jax.grad(self_attn)(x, i)
        assert (np.asarray(g[0, i + 1:]) == 0).all()


def test_additive_attention_layer_d2l_example(key):
    # d2l: queries (2, 1, 20), keys (2, 10, 2), values (2, 10, 4), valid_lens [2, 6]
    layer = additive_attention(8, dropout=0.1)
    q, k = jnp.ones((2, 1, 20)), jnp.ones((2, 10, 2))
    v = jnp.tile(jnp.arange(40, dtype=jnp.float32).reshape(1, 10, 4), (2, 1, 1))
    out_shape, params, state = layer.init(key, (q.shape, k.shape, v.shape))
    assert out_shape == ((2, 1, 4), (2, 1, 10))
    assert params["w_q"].shape == (20, 8) and params["w_k"].shape == (2, 8)
    assert params["w_v"].shape == (8,)
    (out, w), _ = layer.apply(params, state, (q, k, v), valid_lens=jnp.array([2, 6]))
    # identical keys -> uniform weights over the valid ones
    np.testing.assert_allclose(w[0, 0, :2], 0.5, rtol=1e-6)
    np.testing.assert_allclose(w[1, 0, :6], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], [2, 3, 4, 5], rtol=1e-5)
    np.testing.assert_allclose(out[1, 0], [10, 11, 12, 13], rtol=1e-5)
    with pytest.raises(ValueError, match="key"):
        layer.apply(params, state, (q, k, v), train=True)
    with pytest.raises(ShapeError):
        layer.apply(params, state, (jnp.ones((2, 1, 3)), k, v))
    with pytest.raises(ValueError):
        additive_attention(0)


@settings(max_examples=3)
@given(data=st.data())
def test_additive_attention_gradients(data):
    key = jax.random.key(0)
    q = data.draw(ft.arrays((2, 2, 3)))
    k = data.draw(ft.arrays((2, 3, 2)))
    v = data.draw(ft.arrays((2, 3, 2)))
    layer = additive_attention(4)
    _, params, _ = layer.init(key, (q.shape, k.shape, v.shape))
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    mask = padding_mask(jnp.array([2, 3]), 3)[:, None, :]

    def f(p, q, k, v):
        return additive_attention_apply(p, q, k, v, mask=mask)[0]

    ft.check_gradients(jax.jit(f), (params, q, k, v), order=1, dense_check_max_size=0)


def test_multi_head_attention_shapes_and_masking(key):
    layer = multi_head_attention(5, 100)
    q, kv = jnp.ones((2, 4, 100)), jnp.ones((2, 6, 100))
    out_shape, params, state = layer.init(key, (q.shape, kv.shape, kv.shape))
    (out, w), _ = layer.apply(params, state, (q, kv, kv), valid_lens=jnp.array([3, 2]))
    assert out.shape == out_shape[0] == (2, 4, 100) and w.shape == out_shape[1] == (2, 5, 4, 6)
    assert (np.asarray(w[0, ..., 3:]) == 0).all() and (np.asarray(w[1, ..., 2:]) == 0).all()
    (out_c, w_c), _ = layer.apply(params, state, (kv, kv, kv), mask=causal_mask(6))
    assert (np.asarray(w_c[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]]) == 0).all()
    with pytest.raises(ValueError):
        multi_head_attention(3, 100)
