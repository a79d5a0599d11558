"""Seq2seq (plain and Bahdanau attention) as Layers, the encoder-decoder combinator, training
with fdl.train.fit, and Nadaraya–Watson kernel regression."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn
from fdl.data import ArrayLoader
from fdl.models.sequence import nadaraya_watson as nw
from fdl.models.sequence import seq2seq as s2s
from fdl.models.sequence.decoding import beam_search, greedy_search
from fdl.models.sequence.encoder_decoder import encoder_decoder
from fdl.optim import adam, sgd
from fdl.train import fit

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
REAL = os.path.join(ROOT, "..", "shared", "data", "fra-eng.zip")
BOS, EOS, PAD = 2, 3, 1


def small(attention, dropout=0.0, **kw):
    return s2s.seq2seq(11, 13, embed_size=5, num_hiddens=6, num_layers=2, dropout=dropout,
                       attention=attention, **kw)


def batch(rng, b=3, t=5, vs=11, vt=13):
    x = rng.integers(4, vs, size=(b, t)).astype(np.int32)
    y = rng.integers(4, vt, size=(b, t)).astype(np.int32)
    x_len = rng.integers(1, t + 1, size=b).astype(np.int32)
    y_len = rng.integers(1, t + 1, size=b).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(x_len), jnp.asarray(y), jnp.asarray(y_len)


def _init(model, b=3, t=5):
    return model.init(jax.random.key(0), ((b, t), (b,), (b, t)))


@pytest.mark.parametrize("attention", [False, True])
def test_paths_state_and_stepwise_decoding(attention):
    """Readable param paths; the decoder's carry lives in its state; step-by-step decoding
    from the bound state equals the teacher-forced pass; attention weights are masked to the
    source valid_len."""
    model = small(attention)
    out_shape, params, state = _init(model)
    assert out_shape == (3, 5, 13)
    assert set(params) == {"encoder", "decoder"} and set(params["encoder"]) == {"embedding",
                                                                                "rnn"}
    assert ("attention" in params["decoder"]) == attention
    assert params["decoder"]["rnn"]["l0"]["fwd"]["w_ih"].shape[0] == 5 + 6
    assert state["encoder"]["rnn"]["h"].shape == (3, 2, 6)
    x, x_len, y, _ = batch(np.random.default_rng(0))
    full, new_state = jax.jit(model.apply)(params, state, (x, x_len, y))
    assert full.shape == (3, 5, 13) and set(new_state) == {"encoder"}
    dec = model.decoder
    st = model.encode(params, state, x, x_len)
    assert st["rnn"]["h"].shape == (3, 2, 6)

    @jax.jit
    def stepwise(st):
        def body(s, tok):
            logits, s = dec.apply(params["decoder"], s, tok[:, None])
            w = s["attention_weights"] if attention else jnp.zeros(())
            return s, (logits[:, 0], w)

        return jax.lax.scan(body, st, y.T)

    _, (logits, ws) = stepwise(st)
    np.testing.assert_allclose(np.swapaxes(logits, 0, 1), full, rtol=1e-5, atol=1e-5)
    if attention:
        w = np.swapaxes(np.asarray(ws), 0, 1)  # (B, T, T_src)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        for b, n in enumerate(np.asarray(x_len)):
            assert (w[b, :, n:] == 0).all()


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
    np.testing.assert_allclose(s2s.sequence_loss(jnp.asarray(logits), (labels, valid)), got)
    np.testing.assert_array_equal(s2s.teacher_forcing_inputs(jnp.array([[5, 6, 7]]), BOS),
                                  [[BOS, 5, 6]])


def test_dropout_needs_key_and_bad_config():
    model = small(True, dropout=0.5)
    _, params, state = _init(model)
    x, x_len, y, _ = batch(np.random.default_rng(4))
    with pytest.raises(ValueError, match="key"):
        model.apply(params, state, (x, x_len, y), train=True)
    f = jax.jit(lambda k: model.apply(params, state, (x, x_len, y), key=k, train=True)[0])
    a, b = f(jax.random.key(0)), f(jax.random.key(1))
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    with pytest.raises(ValueError, match="num_layers"):
        s2s.seq2seq(5, 5, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        s2s.seq2seq(5, 5, dropout=1.0)
    with pytest.raises(nn.ShapeError, match="'encoder/embedding'.*integer"):
        model.apply(params, state, (jnp.ones((3, 5)), x_len, y))


def test_bad_input_names_the_layer():
    """A decoder called without its encoder state, a state from another batch size, a
    mismatched encoder: errors naming the layer path and the shapes."""
    model = small(True)
    _, params, state = _init(model)
    x, x_len, y, _ = batch(np.random.default_rng(5))
    dec = model.decoder
    with pytest.raises(nn.ShapeError, match="without its encoder state.*bind"):
        dec.apply(params["decoder"], {}, y)
    st = model.encode(params, state, x, x_len)
    with pytest.raises(nn.ShapeError, match=r"tokens of shape \(3, steps\).*got \(2, 5\)"):
        dec.apply(params["decoder"], st, y[:2])
    bad = {**st, "rnn": {"h": st["rnn"]["h"][:2]}}
    with pytest.raises(nn.ShapeError, match="batch size"):
        dec.apply(params["decoder"], bad, y)
    with pytest.raises(nn.ShapeError, match="keys"):
        dec.apply(params["decoder"], {"rnn": st["rnn"]}, y)
    plain = small(False)
    _, pp, ps = _init(plain)
    with pytest.raises(nn.ShapeError, match=r"'rnn' \(gru\).*state\['h'\]"):
        plain.decoder.apply(pp["decoder"], {"rnn": {"h": jnp.zeros((3, 1, 6))},
                                            "context": jnp.zeros((3, 6))}, y)
    with pytest.raises(nn.ShapeError, match="memory_size=6"):
        encoder_decoder(s2s.seq2seq_encoder(11, 5, 7), s2s.seq2seq_decoder(13, 5, 6)).init(
            jax.random.key(0), ((3, 5), (3,), (3, 5)))


def test_translate_under_jit_fixed_shapes_and_beam_one_is_greedy():
    model = small(True)
    _, params, state = _init(model)
    x, x_len, _, _ = batch(np.random.default_rng(5))
    f = jax.jit(s2s.translate, static_argnames=("model", "bos_id", "eos_id", "max_len",
                                                "beam_size", "alpha"))
    g = f(model, params, x, x_len, bos_id=BOS, eos_id=EOS, max_len=7)
    b3 = f(model, params, x, x_len, bos_id=BOS, eos_id=EOS, max_len=7, beam_size=3)
    assert g.tokens.shape == b3.tokens.shape == (3, 7) and b3.aux.shape == (3, 7, 5)
    assert g.aux.shape == (3, 7, 5) and b3.lengths.shape == (3,)
    st = model.encode(params, state, x, x_len)
    b1 = jax.jit(lambda s: beam_search(model.decoder, params["decoder"], s, beam_size=1,
                                       bos_id=BOS, eos_id=EOS, max_len=7,
                                       record=lambda s: s["attention_weights"]))(st)
    g2 = greedy_search(model.decoder, params["decoder"], st, bos_id=BOS, eos_id=EOS, max_len=7)
    np.testing.assert_array_equal(g.tokens, b1.tokens)
    np.testing.assert_array_equal(g.tokens, g2.tokens)
    np.testing.assert_array_equal(g.lengths, b1.lengths)
    np.testing.assert_allclose(g.aux, b1.aux, atol=1e-6)
    with pytest.raises(ValueError, match="beam_size"):
        s2s.translate(model, params, x, x_len, bos_id=BOS, eos_id=EOS, max_len=7, beam_size=0)


def test_fit_trains_it_and_it_memorises_a_pair():
    """One fit for every family: the seq2seq Layer trained by fdl.train.fit (tuple inputs,
    per-token weights) learns two pairs by heart."""
    model = s2s.seq2seq(8, 8, embed_size=8, num_hiddens=16, num_layers=1, dropout=0.0,
                        attention=True)
    x = np.array([[4, 5, EOS, PAD], [6, 7, 5, EOS]], np.int32)
    y = np.array([[6, 4, EOS, PAD], [5, 5, 7, EOS]], np.int32)
    lens = np.array([3, 4], np.int32)
    dec_in = np.asarray(s2s.teacher_forcing_inputs(y, BOS))
    data = ArrayLoader(((x, lens, dec_in), (y, lens)), 2)
    _, params, state = model.init(jax.random.key(5), ((2, 4), (2,), (2, 4)))

    def loss(logits, targets):  # per-token CE with the valid-token mask as weights
        labels, valid = targets
        ce = nn.losses.softmax_cross_entropy(logits, labels, reduction="none")
        return ce, nn.padding_mask(valid, labels.shape[1]).astype(ce.dtype)

    res = fit(model, params, state, adam(0.05), data, epochs=60, key=jax.random.key(6),
              loss=loss, progress=False, print_fn=None)
    hist = res.history["train_loss"]
    assert hist[-1] < 0.1 * hist[0]
    out = s2s.translate(model, res.params, jnp.asarray(x), jnp.asarray(lens), bos_id=BOS,
                        eos_id=EOS, max_len=4, beam_size=2)
    np.testing.assert_array_equal(out.tokens[0, :3], [6, 4, EOS])
    np.testing.assert_array_equal(out.tokens[1], [5, 5, 7, EOS])
    np.testing.assert_array_equal(out.lengths, [2, 3])


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
    model = nw.nadaraya_watson_regression()
    _, params, state = model.init(jax.random.key(1), ((50,), keys.shape, values.shape))
    res = fit(model, params, state, sgd(0.5), ArrayLoader(((x, keys, values), y), 50), epochs=5,
              key=jax.random.key(2), loss=nw.summed_squared_error(), progress=False,
              print_fn=None)
    losses, params = res.history["train_loss"], res.params
    assert losses[-1] < losses[0]
    # the logged loss is the book's summed squared error of the leave-one-out estimator
    y0, _ = model.apply(model.init(jax.random.key(1), ((50,), keys.shape, values.shape))[1], {},
                        (x, keys, values))
    np.testing.assert_allclose(losses[0], float(jnp.sum((y0 - y) ** 2)), rtol=1e-5)
    # the trained kernel is narrower than the non-parametric one and fits the truth better
    assert float(params["w"][0]) > 1.0
    y_np, _ = nw.nadaraya_watson(x_test, x, y)
    y_p, _ = model.apply(params, {}, (x_test, x, y))
    _, w_p = nw.nadaraya_watson(x_test, x, y, params["w"][0])
    assert float(jnp.mean((y_p - y_truth) ** 2)) < float(jnp.mean((y_np - y_truth) ** 2))
    np.testing.assert_allclose(w_p.sum(1), 1.0, rtol=1e-5)


def test_nadaraya_watson_example_smoke(tmp_path):
    ex = _load_example("nadaraya_watson")
    res = ex.main(["--out", str(tmp_path)])
    assert res["mse_parametric"] < res["mse_average"]
    assert (tmp_path / "attention_parametric.png").is_file()
