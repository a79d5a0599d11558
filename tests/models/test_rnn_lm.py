"""Character-level RNN language model as a Layer: shapes and paths, the carry across calls,
training with fdl.train.fit (truncated BPTT and random sampling), generation, and a fast smoke
run of examples/sequence/char_lm.py."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.nn as nn
from fdl.data import ArrayLoader
from fdl.data.text import Vocab, lm_arrays
from fdl.models.sequence.rnn_lm import predict, rnn_lm
from fdl.optim import chain, clip_by_global_norm, sgd
from fdl.train import fit

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TM = os.path.join(ROOT, "..", "shared", "data", "timemachine.txt")


def _toy():
    text = "abcde " * 80
    vocab = Vocab(list(text))
    corpus = vocab[list(text)]
    return vocab, corpus


@pytest.mark.parametrize("cell,kw", [("lstm", {}), ("rnn", {"embed_size": 4}),
                                     ("gru", {"num_layers": 2, "bidirectional": True})])
def test_shapes_paths_and_state(cell, kw, key):
    m = rnn_lm(7, 5, cell=cell, **kw)
    out_shape, p, state = m.init(key, (3, 4))
    assert out_shape == (3, 4, 7)
    assert set(p) == ({"embed", "rnn", "out"} if "embed_size" in kw else {"rnn", "out"})
    d = 2 if kw.get("bidirectional") else 1
    assert p["out"]["w"].shape == (5 * d, 7) and p["rnn"]["l0"]["fwd"]["w_hh"].shape[0] == 5
    assert state["rnn"]["h"].shape == (3, kw.get("num_layers", 1) * d, 5)
    assert ("c" in state["rnn"]) == (cell == "lstm")
    logits, new_state = m.apply(p, state, jnp.zeros((3, 4), jnp.int32))
    assert logits.shape == (3, 4, 7)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert m.config["carry"] == ("reset" if kw.get("bidirectional") else "keep")
    with pytest.raises(nn.ShapeError, match="integer tokens"):
        m.apply(p, state, jnp.zeros((3, 4)))
    with pytest.raises(nn.ShapeError, match="integer tokens"):
        m.init(key, (3, 4, 7))
    with pytest.raises(ValueError, match="cell"):
        rnn_lm(7, cell="transformer")


def test_carry_across_calls_equals_one_pass(key):
    """Feeding the returned state back = one pass over the concatenated tokens (truncated
    BPTT's forward pass); a state from another batch size names the layer."""
    m = rnn_lm(9, 6, cell="lstm", num_layers=2)
    _, p, state = m.init(key, (2, 10))
    toks = jax.random.randint(jax.random.key(1), (2, 10), 0, 9)
    full, s_full = m.apply(p, state, toks)
    a, s1 = m.apply(p, state, toks[:, :4])
    b, s2 = m.apply(p, s1, toks[:, 4:])
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(s2), jax.tree_util.tree_leaves(s_full),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(nn.ShapeError, match=r"layer 'rnn' \(lstm\).*batch of 3"):
        m.apply(p, state, jnp.zeros((3, 4), jnp.int32))


@pytest.mark.parametrize("random_iter", [False, True])
def test_fit_learns_periodic_text(random_iter, key):
    """fit trains the LM (clipped SGD from fdl.optim): sequential partitioning carries the
    state across minibatches, random sampling resets it (carry="reset")."""
    vocab, corpus = _toy()
    x, y = lm_arrays(corpus, 4, 6, random_iter=random_iter)
    k_init, k_fit, k_data = jax.random.split(key, 3)
    loader = ArrayLoader((x, y), 4, last_batch="drop", key=k_data if random_iter else None)
    model = rnn_lm(len(vocab), 16, carry="reset" if random_iter else "keep")
    _, params, state = model.init(k_init, (4, 6))
    res = fit(model, params, state, chain(clip_by_global_norm(1.0), sgd(1.0)), loader,
              epochs=30, key=k_fit, loss="cross_entropy", perplexity=True, progress=False,
              print_fn=None)
    ppl = res.history["train_perplexity"]
    assert ppl[-1] < 0.5 * ppl[0] and len(ppl) == 30
    assert not np.allclose(res.state["rnn"]["h"], 0)  # the final carry is returned
    # the text is periodic: a trained model continues it
    assert predict(model, res.params, "abc", 6, vocab) == "abcde abc"


def test_predict_bad_inputs(key):
    vocab, _ = _toy()
    m = rnn_lm(len(vocab), 4)
    _, p, _ = m.init(key, (1, 1))
    assert predict(m, p, "ab", 0, vocab) == "ab"
    with pytest.raises(ValueError, match="prefix"):
        predict(m, p, "", 3, vocab)
    with pytest.raises(ValueError, match="num_preds"):
        predict(m, p, "a", -1, vocab)
    out = predict(m, p, "zz", 3, vocab)  # unknown prefix chars map to <unk>
    assert out.startswith("zz") and len(out) >= 5
    bi = rnn_lm(len(vocab), 4, bidirectional=True, embed_size=3)  # runs (the book's bad idea)
    _, pb, _ = bi.init(key, (1, 1))
    assert len(predict(bi, pb, "ab", 3, vocab)) >= 5


@pytest.mark.skipif(not os.path.isfile(TM), reason="timemachine.txt not present")
def test_char_lm_example_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "char_lm_example", os.path.join(ROOT, "examples", "sequence", "char_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--data", TM, "--cell", "lstm", "--epochs", "2", "--hidden", "8",
                    "--max-tokens", "2000", "--num-preds", "5", "--log-every", "1",
                    "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "perplexity" in out and "tokens/s" in out and "time traveller" in out
    assert os.path.isfile(tmp_path / "char_lm_lstm.png")
    assert np.isfinite(res["perplexity"]) and res["perplexity"] < 40
