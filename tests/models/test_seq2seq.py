"""Seq2seq (plain and Bahdanau attention) and Nadaraya–Watson kernel regression."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.models.sequence import nadaraya_watson as nw
from fdl.models.sequence import seq2seq as s2s
from fdl.models.sequence.decoding import beam_search
from fdl.optim import sgd

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
REAL = os.path.join(ROOT, "..", "shared", "data", "fra-eng.zip")
BOS, EOS, PAD = 2, 3, 1


def small_cfg(attention, dropout=0.0):
    return s2s.Seq2SeqConfig(11, 13, embed_size=5, num_hiddens=6, num_layers=2,
                             dropout=dropout, attention=attention)


def batch(rng, b=3, t=5, vs=11, vt=13):
    x = rng.integers(4, vs, size=(b, t)).astype(np.int32)
    y = rng.integers(4, vt, size=(b, t)).astype(np.int32)
    x_len = rng.integers(1, t + 1, size=b).astype(np.int32)
    y_len = rng.integers(1, t + 1, size=b).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(x_len), jnp.asarray(y), jnp.asarray(y_len)


def _apply_jit():
    return jax.jit(s2s.apply_seq2seq, static_argnames=("cfg", "train"))


@pytest.mark.parametrize("attention", [False, True])
def test_shapes_masking_and_stepwise_decoding(attention):
    """Shapes, attention masked to the source valid_len, and cached step-by-step decoding
    equal to the teacher-forced pass (logits and attention weights)."""
    cfg = small_cfg(attention)
    params = s2s.init_seq2seq(jax.random.key(0), cfg)
    assert ("attention" in params["decoder"]) == attention
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    if attention:
        assert set(params["decoder"]["attention"]) == {"w_q", "w_k", "w_v"}
    x, x_len, y, _ = batch(np.random.default_rng(0))
    full, w_full = _apply_jit()(params, cfg, x, x_len, y)
    assert full.shape == (3, 5, 13)
    if attention:
        assert w_full.shape == (3, 5, 5)  # (batch, target steps, source steps)
        w = np.asarray(w_full)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        for b, n in enumerate(np.asarray(x_len)):
            assert (w[b, :, n:] == 0).all()
    else:
        assert w_full is None

    @jax.jit
    def stepwise(params, x, x_len, y):
        enc_out, enc_state = s2s.encode(params, cfg, x)
        carry = s2s.decoder_init_carry(cfg, enc_out, enc_state, x_len)
        step = s2s.decode_step(params, cfg)

        def body(c, tok):
            logits, c, aux = step(c, tok)
            return c, (logits, aux)

        _, (logits, aux) = jax.lax.scan(body, carry, y.T)
        return jnp.swapaxes(logits, 0, 1), (None if aux is None else jnp.swapaxes(aux, 0, 1))

    logits, aux = stepwise(params, x, x_len, y)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    if attention:
        np.testing.assert_allclose(aux, w_full, rtol=1e-5, atol=1e-6)


def test_masked_softmax_ce_loss_matches_d2l_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 6))
    labels = rng.integers(0, 6, size=(3, 4))
    valid = np.array([4, 2, 0])
    got = np.asarray(s2s.masked_softmax_ce_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                jnp.asarray(valid)))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mask = np.arange(4)[None] < valid[:, None]
    np.testing.assert_allclose(got, (ce * mask).mean(1), rtol=1e-10)
    # d2l's example: loss(ones(3, 4, 10), ones((3, 4)), [4, 2, 0]) = [2.3026, 1.1513, 0]
    d2l = s2s.masked_softmax_ce_loss(jnp.ones((3, 4, 10)), jnp.ones((3, 4), jnp.int32),
                                     jnp.array([4, 2, 0]))
    np.testing.assert_allclose(d2l, [2.3026, 1.1513, 0.0], atol=1e-4)


def test_padding_last_batch_changes_no_gradient():
    cfg = s2s.Seq2SeqConfig(11, 13, embed_size=4, num_hiddens=4, num_layers=1, dropout=0.0,
                            attention=True)
    params = s2s.init_seq2seq(jax.random.key(2), cfg)
    b = batch(np.random.default_rng(3))
    padded = tuple(jnp.asarray(a) for a in s2s._pad_batch(b, 5))
    assert padded[0].shape == (5, 5) and list(np.asarray(padded[3][3:])) == [0, 0]
    grads = jax.jit(jax.grad(lambda p, bb: s2s.seq2seq_loss(p, cfg, bb, BOS, train=False)[0]))
    g1, g2 = grads(params, b), grads(params, padded)
    for a, c in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
        assert np.isfinite(np.asarray(c)).all()


def test_dropout_needs_key_and_bad_config():
    cfg = small_cfg(True, dropout=0.5)
    params = s2s.init_seq2seq(jax.random.key(3), cfg)
    b = batch(np.random.default_rng(4))
    with pytest.raises(ValueError, match="key"):
        s2s.seq2seq_loss(params, cfg, b, BOS, train=True)
    loss = jax.jit(lambda p, bb, k: s2s.seq2seq_loss(p, cfg, bb, BOS, key=k, train=True)[0])
    l1, l2 = loss(params, b, jax.random.key(0)), loss(params, b, jax.random.key(1))
    assert np.isfinite(float(l1)) and float(l1) != float(l2)
    with pytest.raises(ValueError, match="num_layers"):
        s2s.Seq2SeqConfig(5, 5, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        s2s.Seq2SeqConfig(5, 5, dropout=1.0)
    with pytest.raises(ValueError, match="integer tokens"):
        s2s.encode(params, cfg, jnp.ones((2, 3)))


def test_translate_under_jit_fixed_shapes_and_beam_one_is_greedy():
    cfg = small_cfg(True)
    params = s2s.init_seq2seq(jax.random.key(4), cfg)
    x, x_len, _, _ = batch(np.random.default_rng(5))
    f = jax.jit(s2s.translate, static_argnames=("cfg", "bos_id", "eos_id", "max_len",
                                                "beam_size", "alpha"))
    g = f(params, cfg, x, x_len, bos_id=BOS, eos_id=EOS, max_len=7)
    b3 = f(params, cfg, x, x_len, bos_id=BOS, eos_id=EOS, max_len=7, beam_size=3)
    assert g.tokens.shape == b3.tokens.shape == (3, 7) and b3.aux.shape == (3, 7, 5)
    assert g.aux.shape == (3, 7, 5) and b3.lengths.shape == (3,)

    @jax.jit
    def beam1(params, x, x_len):
        enc_out, enc_state = s2s.encode(params, cfg, x)
        carry = s2s.decoder_init_carry(cfg, enc_out, enc_state, x_len)
        return beam_search(s2s.decode_step(params, cfg), carry, 3, beam_size=1, bos_id=BOS,
                           eos_id=EOS, max_len=7)

    b1 = beam1(params, x, x_len)
    np.testing.assert_array_equal(g.tokens, b1.tokens)
    np.testing.assert_array_equal(g.lengths, b1.lengths)
    np.testing.assert_allclose(g.aux, b1.aux, atol=1e-6)
    with pytest.raises(ValueError, match="beam_size"):
        s2s.translate(params, cfg, x, x_len, bos_id=BOS, eos_id=EOS, max_len=7, beam_size=0)


class _Data:
    def __init__(self, b):
        self.b, self.batch_size = b, b[0].shape[0]

    def batches(self, key):
        yield tuple(np.asarray(a) for a in self.b)


def test_training_reduces_loss_and_memorises_a_pair():
    cfg = s2s.Seq2SeqConfig(8, 8, embed_size=8, num_hiddens=16, num_layers=1, dropout=0.0,
                            attention=True)
    params = s2s.init_seq2seq(jax.random.key(5), cfg)
    x = np.array([[4, 5, EOS, PAD], [6, 7, 5, EOS]], np.int32)
    y = np.array([[6, 4, EOS, PAD], [5, 5, 7, EOS]], np.int32)
    data = _Data((x, np.array([3, 4], np.int32), y, np.array([3, 4], np.int32)))
    params, hist = s2s.train_seq2seq(params, cfg, data, sgd(0.5), bos_id=BOS, num_epochs=150,
                                     key=jax.random.key(6), log=None)
    assert hist["loss"][-1] < 0.2 * hist["loss"][0]
    res = s2s._translate_jit(params, cfg, jnp.asarray(x), jnp.array([3, 4]), bos_id=BOS,
                             eos_id=EOS, max_len=4, beam_size=2)
    np.testing.assert_array_equal(res.tokens[0, :3], [6, 4, EOS])
    np.testing.assert_array_equal(res.tokens[1], [5, 5, 7, EOS])
    np.testing.assert_array_equal(res.lengths, [2, 3])


def _load_example(name):
    path = os.path.join(ROOT, "examples", "sequence", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.path.isfile(REAL), reason="fra-eng.zip not available")
def test_seq2seq_example_smoke(tmp_path, capsys):
    ex = _load_example("seq2seq")
    res = ex.main(["--data", REAL, "--epochs", "1", "--num-examples", "40", "--embed", "4",
                   "--hidden", "4", "--layers", "1", "--batch-size", "32", "--no-plots"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "go . =>" in out and "bleu" in out
    assert len(res["bleu"]) == 4 and all(0.0 <= s <= 1.0 for s in res["bleu"])
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        ex.main(["--data", str(tmp_path / "nope.zip"), "--epochs", "1", "--no-plots"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(REAL), reason="fra-eng.zip not available")
def test_seq2seq_example_attention_beam_plots(tmp_path, capsys):
    ex = _load_example("seq2seq")
    res = ex.main(["--data", REAL, "--attention", "--epochs", "2", "--num-examples", "80",
                   "--embed", "8", "--hidden", "8", "--batch-size", "32", "--beam-size", "2",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "greedy:" in out and "beam search k=2" in out
    assert len(res["bleu"]) == 4
    assert (tmp_path / "attention.png").is_file() and (tmp_path / "loss_attention.png").is_file()


# ----------------------------------------------------------------------------- Nadaraya–Watson


def test_nadaraya_watson_matches_formula():
    rng = np.random.default_rng(7)
    q, k, v = rng.uniform(0, 5, 4), rng.uniform(0, 5, 6), rng.normal(size=6)
    y, w = nw.nadaraya_watson(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 2.0)
    logits = -((q[:, None] - k[None]) * 2.0) ** 2 / 2
    ref_w = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(w, ref_w, rtol=1e-10)
    np.testing.assert_allclose(y, ref_w @ v, rtol=1e-10)
    with pytest.raises(ValueError):
        nw.nadaraya_watson(jnp.ones(3), jnp.ones((2, 4)), jnp.ones((2, 4)))


def test_leave_one_out_and_learned_width():
    x, y, x_test, y_truth = nw.synthetic_data(jax.random.key(0))
    assert x.shape == y.shape == (50,) and x_test.shape == y_truth.shape == (50,)
    assert (np.diff(np.asarray(x)) >= 0).all()
    keys, values = nw.leave_one_out(x, y)
    assert keys.shape == (50, 49)
    for i in (0, 17, 49):
        assert float(x[i]) not in np.asarray(keys[i]).tolist()
    params = nw.init_nadaraya_watson(jax.random.key(1))
    params, losses = nw.fit_nadaraya_watson(params, x, y, epochs=5)
    assert losses[-1] < losses[0]
    # the trained kernel is narrower than the non-parametric one and fits the truth better
    assert float(params["w"][0]) > 1.0
    y_np, _ = nw.nadaraya_watson(x_test, x, y)
    y_p, w_p = nw.nadaraya_watson_apply(params, x_test, x, y)
    assert float(jnp.mean((y_p - y_truth) ** 2)) < float(jnp.mean((y_np - y_truth) ** 2))
    np.testing.assert_allclose(w_p.sum(1), 1.0, rtol=1e-5)


def test_nadaraya_watson_example_smoke(tmp_path):
    ex = _load_example("nadaraya_watson")
    res = ex.main(["--out", str(tmp_path)])
    assert res["mse_parametric"] < res["mse_average"]
    assert (tmp_path / "attention_parametric.png").is_file()
