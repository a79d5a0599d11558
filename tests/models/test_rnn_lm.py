"""Character-level RNN language model: shapes, training reduces perplexity, generation, and a
fast smoke run of examples/sequence/char_lm.py."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.data.text import SeqDataLoader, Vocab
from fdl.models.sequence.rnn_lm import RNNLM, make_train_step, predict, train_rnn_lm

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TM = os.path.join(ROOT, "..", "shared", "data", "timemachine.txt")


def _toy():
    text = "abcde " * 80
    vocab = Vocab(list(text))
    corpus = vocab[list(text)]
    return vocab, corpus


@pytest.mark.parametrize("cell,kw", [("lstm", {}), ("rnn", {"embed_size": 4}),
                                     ("gru", {"num_layers": 2, "bidirectional": True})])
def test_shapes_and_params(cell, kw, key):
    m = RNNLM(7, 5, cell=cell, **kw)
    p = m.init(key)
    assert ("embed" in p) == ("embed_size" in kw)
    d = 2 if kw.get("bidirectional") else 1
    assert p["out"]["w"].shape == (5 * d, 7)
    logits, state = m.apply(p, jnp.zeros((3, 4), jnp.int32))
    assert logits.shape == (3, 4, 7)
    ref = m.begin_state(3)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(ref)
    with pytest.raises(ValueError, match="integer tokens"):
        m.apply(p, jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="cell"):
        RNNLM(7, cell="transformer")


def test_train_step_clips_and_learns_periodic_text(key):
    vocab, corpus = _toy()
    loader = SeqDataLoader(corpus, 4, 6, seed=0)
    model = RNNLM(len(vocab), 16, cell="gru")
    k_init, k_train, k_init2, k_step = jax.random.split(key, 4)
    params = model.init(k_init)
    params, hist = train_rnn_lm(model, params, loader, 30, lr=1.0, theta=1.0, key=k_train)
    assert hist["perplexity"][-1] < 0.5 * hist["perplexity"][0]
    assert hist["tokens_per_s"] > 0 and len(hist["perplexity"]) == 30
    # the text is periodic: a trained model continues it
    assert predict(model, params, "abc", 6, vocab) == "abcde abc"
    # clipping: one step never moves params by more than lr * theta in global norm
    opt_init, step = make_train_step(model, lr=1.0, theta=1.0)
    X, Y = next(iter(loader))
    p0 = model.init(k_init2)
    p1, _, _, _ = step(p0, opt_init(p0), X, Y, model.begin_state(4), k_step)
    delta = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p0))))
    assert float(delta) <= 1.0 + 1e-5


def test_predict_bad_inputs(key):
    vocab, _ = _toy()
    m = RNNLM(len(vocab), 4)
    p = m.init(key)
    assert predict(m, p, "ab", 0, vocab) == "ab"
    with pytest.raises(ValueError, match="prefix"):
        predict(m, p, "", 3, vocab)
    with pytest.raises(ValueError, match="num_preds"):
        predict(m, p, "a", -1, vocab)
    out = predict(m, p, "zz", 3, vocab)  # unknown prefix chars map to <unk>
    assert out.startswith("zz") and len(out) >= 5


@pytest.mark.skipif(not os.path.isfile(TM), reason="timemachine.txt not present")
def test_char_lm_example_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "char_lm_example", os.path.join(ROOT, "examples", "sequence", "char_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--data", TM, "--cell", "lstm", "--epochs", "2", "--hidden", "8",
                    "--max-tokens", "2000", "--num-preds", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "perplexity" in out and "tokens/s" in out and "time traveller" in out
    assert os.path.isfile(tmp_path / "char_lm_lstm.png")
    assert np.isfinite(res["perplexity"]) and res["perplexity"] < 40


def test_optimizer_equals_local_clipped_sgd():
    from fdl.models.sequence.rnn_lm import _local_sgd_with_clipping, sgd_with_clipping

    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    p = jax.tree_util.tree_map(jnp.zeros_like, g)
    outs = []
    for init, update in (sgd_with_clipping(0.5, 1.0), _local_sgd_with_clipping(0.5, 1.0)):
        outs.append(update(g, init(p), p)[0])
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(outs[0]["b"], [-0.5 * 12 / 13], rtol=1e-6)
