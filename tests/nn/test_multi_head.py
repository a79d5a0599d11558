"""Multi-head layers: fused-QKV self-attention, the KV cache in layer state, keyword masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.nn.attention import causal_mask, dot_product_attention
from fdl.nn.core import ShapeError
from fdl.nn.multi_head import (
    init_kv_cache,
    multi_head_attention,
    project_kv,
    self_attention,
)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _split_params(p, use_bias=True):
    """self_attention params -> multi_head_attention params (same weights)."""
    w = jnp.split(p["qkv"]["w"], 3, axis=1)
    out = {n: {"w": wi} for n, wi in zip(("w_q", "w_k", "w_v"), w)}
    out["w_o"] = {"w": p["out"]["w"]}
    if use_bias:
        for n, bi in zip(("w_q", "w_k", "w_v"), jnp.split(p["qkv"]["b"], 3)):
            out[n]["b"] = bi
        out["w_o"]["b"] = p["out"]["b"]
    return out


def test_fused_self_attention_equals_separate_projections(key):
    sa = self_attention(4, 16, use_bias=True)
    mha = multi_head_attention(4, 16, use_bias=True)
    x = _x((2, 5, 8))
    shape, p, s = sa.init(key, x.shape)
    assert shape == ((2, 5, 16), (2, 4, 5, 5)) and p["qkv"]["w"].shape == (8, 48)
    p = jax.tree_util.tree_map(lambda a: a + 0.1, p)  # non-zero biases
    vl = jnp.array([3, 5])
    (y1, w1), _ = sa.apply(p, s, x, valid_lens=vl)
    (y2, w2), _ = mha.apply(_split_params(p), {}, (x, x, x), valid_lens=vl)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-7)
    assert (np.asarray(w1[0, :, :, 3:]) == 0).all()
    # the same as the pure core on head-first arrays
    q = (x @ p["qkv"]["w"][:, :16] + p["qkv"]["b"][:16]).reshape(2, 5, 4, 4).transpose(0, 2, 1, 3)
    k = (x @ p["qkv"]["w"][:, 16:32] + p["qkv"]["b"][16:32]).reshape(2, 5, 4, 4)
    _, w3 = dot_product_attention(q, k.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                  mask=jnp.arange(5)[None, None, None, :] < vl[:, None, None, None])
    np.testing.assert_allclose(w1, w3, rtol=1e-5, atol=1e-7)


def test_keyword_masks_and_refusals(key):
    mha = multi_head_attention(2, 8)
    q, kv = _x((2, 3, 8)), _x((2, 4, 8), 1)
    _, p, s = mha.init(key, (q.shape, kv.shape, kv.shape))
    with pytest.raises(ShapeError, match="keyword"):
        mha.apply(p, s, (q, kv, kv, jnp.array([1, 2])))
    with pytest.raises(TypeError, match="valid_lens"):
        mha.apply(p, s, (q, kv, kv), mask=jnp.array([1, 2]))
    with pytest.raises(TypeError, match="mask"):
        mha.apply(p, s, (q, kv, kv), valid_lens=jnp.ones((2, 4), bool))
    # per-query lengths (B, Q) combined with an explicit mask
    vl = jnp.array([[1, 2, 4], [4, 3, 0]])
    m = jnp.array([True, False, True, True])
    (out, w), _ = mha.apply(p, s, (q, kv, kv), valid_lens=vl, mask=m)
    w = np.asarray(w)
    for b in range(2):
        for i in range(3):
            allowed = (np.arange(4) < int(vl[b, i])) & np.asarray(m)
            assert (w[b, :, i, ~allowed] == 0).all()
            if allowed.any():
                np.testing.assert_allclose(w[b, :, i].sum(-1), 1.0, rtol=1e-6)
    # a fully masked query: zero weights, zero output before the output projection
    assert (w[1, :, 2] == 0).all()
    with pytest.raises(ValueError, match="divisible"):
        self_attention(3, 16)


def test_project_kv_state_equals_projection(key):
    mha = multi_head_attention(2, 8, use_bias=True)
    q, kv = _x((2, 3, 6)), _x((2, 4, 5), 1)
    _, p, _ = mha.init(key, (q.shape, kv.shape, kv.shape))
    (y1, w1), _ = mha.apply(p, {}, (q, kv, kv), valid_lens=jnp.array([2, 4]))
    st = project_kv(p, kv, kv, 2)
    (y2, w2), st2 = mha.apply(p, st, (q, None, None), valid_lens=jnp.array([2, 4]))
    np.testing.assert_allclose(y1, y2, rtol=1e-6)
    assert st2 is st


@pytest.mark.parametrize("pieces", [[1] * 6, [2, 3, 1], [6]])
def test_kv_cache_pieces_equal_full_causal_pass(key, pieces):
    sa = self_attention(2, 8, causal=True)
    x = _x((3, 6, 8))
    _, p, s = sa.init(key, x.shape)
    (full, w_full), _ = sa.apply(p, s, x)
    assert (np.asarray(w_full)[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()
    cache = init_kv_cache(3, 8, 2, 4)
    step = jax.jit(sa.apply)
    outs, start = [], 0
    for n in pieces:
        (y, w), cache = step(p, cache, x[:, start:start + n])
        assert w.shape == (3, 2, n, 8)
        np.testing.assert_allclose(w[..., :start + n], w_full[:, :, start:start + n, :start + n],
                                   rtol=1e-5, atol=1e-7)
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache["index"], [6, 6, 6])
    with pytest.raises(ValueError, match="max_len"):
        sa.apply(p, cache, x[:, :3])


def test_kv_cache_padding_and_non_causal(key):
    sa = self_attention(2, 8)  # not causal: cached pieces see every position written so far
    x = _x((2, 4, 8))
    _, p, s = sa.init(key, x.shape)
    vl = jnp.array([2, 4])
    (full, _), _ = sa.apply(p, s, x, valid_lens=vl)
    cache = init_kv_cache(2, 4, 2, 4)
    (y, _), cache = sa.apply(p, cache, x, valid_lens=vl)
    np.testing.assert_allclose(y, full, rtol=1e-5, atol=1e-6)


def test_causal_mask_matches_core_and_bf16_softmax_in_float32(key):
    sa = self_attention(2, 8, causal=True, use_bias=False)
    x = _x((1, 5, 8))
    _, p, s = sa.init(key, x.shape)
    (y32, _), _ = sa.apply(p, s, x)
    pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
    (yb, wb), _ = sa.apply(pb, s, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16 and wb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(yb, np.float32), y32, atol=5e-2)
    m = causal_mask(5)
    assert m.shape == (5, 5)
