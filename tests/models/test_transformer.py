"""The transformer: KV-cached decoding equals the full pass, causality, scan/remat, decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdl import nn
from fdl.models.sequence.transformer import (
    decoder_state,
    init_decoding,
    start_decoding,
    transformer,
    transformer_decoder,
    transformer_encoder,
    translate,
)
from fdl.nn.transformer import block_stack, decoder_block

V_SRC, V_TGT, D, FFN, HEADS, LAYERS = 13, 11, 16, 32, 4, 2


def _toks(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


@pytest.fixture(scope="module")
def model_and_params():
    model = transformer(V_SRC, V_TGT, D, FFN, HEADS, LAYERS, dropout=0.1, max_len=12)
    _, params, state = model.init(jax.random.key(1), ((3, 6), (3,), (3, 5)))
    assert state == {}
    return model, params


def test_shapes_and_padding_independence(model_and_params):
    model, params = model_and_params
    src, tgt = _toks((3, 6), V_SRC), _toks((3, 5), V_TGT, 1)
    vl = jnp.array([6, 3, 1])
    logits, _ = model.apply(params, {}, (src, vl, tgt))
    assert logits.shape == (3, 5, V_TGT) and logits.dtype == jnp.float32
    # tokens beyond valid_lens do not matter
    src2 = src.at[1, 3:].set(0).at[2, 1:].set(5)
    logits2, _ = model.apply(params, {}, (src2, vl, tgt))
    np.testing.assert_allclose(logits, logits2, rtol=1e-5, atol=1e-5)
    (lg, w), _ = model.apply(params, {}, (src, vl, tgt), return_attention=True)
    np.testing.assert_allclose(lg, logits, rtol=1e-6)
    assert len(w["encoder"]) == LAYERS and w["encoder"][0].shape == (3, HEADS, 6, 6)
    self_w, cross_w = w["decoder"][1]
    assert self_w.shape == (3, HEADS, 5, 5) and cross_w.shape == (3, HEADS, 5, 6)
    assert (np.asarray(cross_w[2, :, :, 1:]) == 0).all()
    with pytest.raises(ValueError, match="key"):
        model.apply(params, {}, (src, vl, tgt), train=True)


def test_cached_decoding_equals_full_pass(model_and_params):
    model, params = model_and_params
    src, tgt = _toks((3, 6), V_SRC), _toks((3, 7), V_TGT, 2)
    vl = jnp.array([6, 4, 2])
    full, _ = model.apply(params, {}, (src, vl, tgt))
    dec = dict(model.children)["decoder"]
    state = start_decoding(model, params, src, vl, max_len=9)
    step = jax.jit(dec.apply)
    outs, start = [], 0
    for n in (1, 1, 3, 1, 1):  # single tokens and a chunk
        y, state = step(params["decoder"], state, tgt[:, start:start + n])
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(state["index"], [7, 7, 7])


def test_decoder_only_cache_and_missing_memory(key):
    dec = transformer_decoder(V_TGT, D, FFN, HEADS, LAYERS, cross_attention=False, max_len=8,
                              positional="learned")
    _, p, s = dec.init(key, (2, 6))
    x = _toks((2, 6), V_TGT)
    full, _ = dec.apply(p, s, x)
    st = init_decoding(dec, p, 2, 8)
    outs = []
    for t in range(6):
        y, st = dec.apply(p, st, x[:, t:t + 1])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    enc_dec = transformer_decoder(V_TGT, D, FFN, HEADS, 1)
    _, p2, s2 = enc_dec.init(key, (2, 6))
    with pytest.raises(ValueError, match="memory"):
        enc_dec.apply(p2, s2, x)


@settings(max_examples=4)
@given(t=st.integers(2, 7), data=st.data())
def test_causal_decoder_has_zero_gradient_to_future(t, data):
    i = data.draw(st.integers(0, t - 2))
    stack = block_stack(decoder_block(2, 8, 16), 2)
    _, p, _ = stack.init(jax.random.key(t), (1, t, 8))
    x = jnp.asarray(np.random.default_rng(t).normal(size=(1, t, 8)), jnp.float32)
    mem = jnp.asarray(np.random.default_rng(t + 1).normal(size=(1, 3, 8)), jnp.float32)

    r = jnp.asarray(np.random.default_rng(t + 2).normal(size=(8,)), jnp.float32)

    def out_i(x):  # a random projection: the sum of a LayerNorm output is constant
        (y, _), _ = stack.apply(p, {}, x, memory=mem)
        return jnp.sum(y[0, i] * r)

    g = np.asarray(jax.jit(jax.grad(out_i))(x))
    assert (g[0, i + 1:] == 0).all()  # exactly zero, not just small
    assert np.abs(g[0, : i + 1]).max() > 0


def test_scan_and_remat_equal_unrolled(key):
    kw = dict(max_len=8)
    base = transformer_encoder(V_SRC, D, FFN, HEADS, 3, **kw)
    scanned = transformer_encoder(V_SRC, D, FFN, HEADS, 3, scan_layers=True,
                                  remat="dots_saveable", **kw)
    _, p, _ = base.init(key, (2, 5))
    _, ps, _ = scanned.init(key, (2, 5))
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                     *[p["blocks"][str(i)] for i in range(3)])
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(ps["blocks"])):
        np.testing.assert_array_equal(a, b)  # same init, stacked
    x, vl = _toks((2, 5), V_SRC), jnp.array([5, 2])

    def loss(m, params):
        return jnp.sum(jnp.tanh(m.apply(params, {}, x, valid_lens=vl)[0]))

    l1, g1 = jax.jit(jax.value_and_grad(lambda q: loss(base, q)))(p)
    l2, g2 = jax.jit(jax.value_and_grad(lambda q: loss(scanned, q)))(ps)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    g2_blocks = {str(i): jax.tree_util.tree_map(lambda a, i=i: a[i], g2["blocks"])
                 for i in range(3)}
    for a, b in zip(jax.tree_util.tree_leaves(g1["blocks"]), jax.tree_util.tree_leaves(g2_blocks)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # remat=True: fdl.nn.remat (jax.checkpoint) on every layer, the params unchanged
    rm = transformer_encoder(V_SRC, D, FFN, HEADS, 3, remat=True, **kw)
    assert "remat" in str(jax.make_jaxpr(jax.grad(lambda q: loss(rm, q)))(p))
    assert "remat" not in str(jax.make_jaxpr(jax.grad(lambda q: loss(base, q)))(p))
    with pytest.raises(ValueError, match="policy"):
        transformer_encoder(V_SRC, D, FFN, HEADS, 3, remat="sometimes")


def test_translate_greedy_matches_full_pass_loop_and_beam_runs(model_and_params):
    model, params = model_and_params
    src, vl = _toks((2, 6), V_SRC, 3), jnp.array([6, 3])
    run = jax.jit(translate, static_argnums=0,
                  static_argnames=("bos_id", "eos_id", "max_len", "beam_size"))
    res = run(model, params, src, vl, bos_id=1, eos_id=2, max_len=6)
    assert res.tokens.shape == (2, 6) and res.aux.shape == (2, 6, LAYERS, HEADS, 6)
    # greedy by re-running the full teacher-forced pass on the prefix
    # (causal: the logits at position i do not depend on later tokens, so one fixed-shape
    # program serves every prefix length)
    prefix = jnp.zeros((2, 7), jnp.int32).at[:, 0].set(1)
    full = jax.jit(lambda p, x: model.apply(p, {}, x)[0])
    for i in range(6):
        logits = full(params, (src, vl, prefix))
        prefix = prefix.at[:, i + 1].set(jnp.argmax(logits[:, i], -1).astype(jnp.int32))
    for b in range(2):
        n = int(res.lengths[b])
        np.testing.assert_array_equal(res.tokens[b, :n], prefix[b, 1:n + 1])
    beam = run(model, params, src, vl, bos_id=1, eos_id=2, max_len=6, beam_size=3)
    assert beam.tokens.shape == (2, 6)
    assert decoder_state(None) == {}


@pytest.mark.slow  # ~10 s quiet: one more decoding program
def test_generic_layer_search_drives_the_cached_decoder(model_and_params):
    """decoding.greedy_search over the decoder Layer (the protocol form: the KV cache is its
    state) gives translate's tokens; translate keeps the *_steps form because its aux (the
    cross-attention weights) comes from the decoder's output, not its state."""
    from fdl.models.sequence.decoding import greedy_search

    model, params = model_and_params
    src, vl = _toks((2, 6), V_SRC, 3), jnp.array([6, 3])
    ref = translate(model, params, src, vl, bos_id=1, eos_id=2, max_len=6)
    state = start_decoding(model, params, src, vl, 6)
    got = greedy_search(dict(model.children)["decoder"], params["decoder"], state, bos_id=1,
                        eos_id=2, max_len=6)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    for b in range(2):
        n = int(ref.lengths[b])
        np.testing.assert_array_equal(got.tokens[b, :n], ref.tokens[b, :n])


def test_bad_input(key):
    enc = transformer_encoder(V_SRC, D, FFN, HEADS, 1, max_len=4)
    _, p, _ = enc.init(key, (1, 4))
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        enc.apply(p, {}, jnp.array([[1, 13, 2, 0]]))
    with pytest.raises(ValueError, match="max_len 4"):
        enc.apply(p, {}, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="divisible"):
        transformer_encoder(V_SRC, 10, FFN, 4, 1)
    with pytest.raises(ValueError, match="compute_dtype must be None or one of"):
        transformer_encoder(V_SRC, D, FFN, HEADS, 1, compute_dtype="int8")


def test_bf16_compute_close_to_float32(key):
    f32 = transformer_encoder(V_SRC, D, FFN, HEADS, 2)
    b16 = transformer_encoder(V_SRC, D, FFN, HEADS, 2, compute_dtype=jnp.bfloat16)
    _, p, _ = f32.init(key, (2, 5))
    x = _toks((2, 5), V_SRC)
    y32, _ = jax.jit(f32.apply)(p, {}, x)
    y16, _ = jax.jit(b16.apply)(p, {}, x)
    assert y16.dtype == jnp.bfloat16 and p["embedding"]["table"].dtype == jnp.float32
    err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)))
    assert 0 < err < 0.1
    # the library-wide policy on the same model: float32 out, LayerNorm params kept float32
    mp = nn.mixed_precision(f32, "bfloat16")
    ymp, _ = jax.jit(mp.apply)(p, {}, x)
    assert ymp.dtype == jnp.float32
    err_mp = float(jnp.max(jnp.abs(ymp - y32)))
    assert 0 < err_mp < 0.1
