"""Greedy / beam search on hand-built Markov decoder Layers, and d2l's BLEU."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn
from fdl.models.sequence.bleu import bleu
from fdl.models.sequence.decoding import beam_search, greedy_search

EOS, BOS, A, B, C = 0, 1, 2, 3, 4


def table_decoder(table) -> nn.Layer:
    """A decoder Layer whose next-token distribution depends on (step, previous token).

    state: ``{"t": (N,) int32 step counter, "last": (N, 2) (step, previous token) as floats}``
    (recorded as the search's aux); input tokens (N, 1) -> logits (N, 1, V)."""
    logt = jnp.log(jnp.asarray(table, jnp.float32))

    def init(key, in_shape):
        return (*in_shape, logt.shape[-1]), {}, _state(in_shape[0])

    def apply(params, state, x, *, key=None, train=False):
        tok, t = x[:, 0], state["t"]
        last = jnp.stack([t, tok], axis=-1).astype(jnp.float32)
        return logt[t, tok][:, None, :], {"t": t + 1, "last": last}

    return nn.Layer(init, apply, name="markov")


def _state(n):
    return {"t": jnp.zeros((n,), jnp.int32), "last": jnp.zeros((n, 2), jnp.float32)}


def hand_table():
    """Greedy gives A B C <eos> (p=.048); the best sequence is A C B <eos> (p=.054)."""
    eps = 1e-6
    t = np.full((4, 5, 5), 0.25)
    t[:, :, BOS] = eps
    t[0, BOS] = [0.1, eps, 0.5, 0.2, 0.2]
    t[1, A] = [0.1, eps, 0.2, 0.4, 0.3]
    t[2, B] = [0.2, eps, 0.2, 0.2, 0.4]
    t[2, C] = [0.2, eps, 0.1, 0.6, 0.1]
    t[3, :] = [0.6, eps, 0.4 / 3, 0.4 / 3, 0.4 / 3]
    return t / t.sum(-1, keepdims=True)


def brute_force_best(table, max_len, alpha):
    """Exhaustive search over every output sequence (ending at <eos> or at max_len)."""
    v = table.shape[-1]
    best, best_seq = -np.inf, None
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(v), repeat=length):
            if EOS in seq[:-1] or (length < max_len and seq[-1] != EOS):
                continue
            prev, lp = BOS, 0.0
            for t, tok in enumerate(seq):
                lp += math.log(table[t, prev, tok])
                prev = tok
            s = lp / length**alpha
            if s > best:
                best, best_seq = s, seq
    return best, best_seq


def run(fn, table, batch, **kw):
    return fn(table_decoder(table), {}, _state(batch), bos_id=BOS, eos_id=EOS,
              record=lambda s: s["last"], **kw)


def test_greedy_on_hand_model():
    r = run(greedy_search, hand_table(), 2, max_len=4)
    np.testing.assert_array_equal(r.tokens[0], [A, B, C, EOS])
    assert int(r.lengths[0]) == 3
    np.testing.assert_allclose(float(r.scores[0]), math.log(0.5 * 0.4 * 0.4 * 0.6), rtol=1e-4)
    # aux stacked over steps: (B, max_len, 2) holding (step, previous token)
    assert r.aux.shape == (2, 4, 2)
    np.testing.assert_array_equal(r.aux[0, :, 1], [BOS, A, B, C])


@pytest.mark.parametrize("alpha", [0.0, 0.75])
def test_beam_finds_better_sequence_than_greedy(alpha):
    table = hand_table()
    g = run(greedy_search, table, 1, max_len=4)
    b = run(beam_search, table, 1, max_len=4, beam_size=2, alpha=alpha)
    np.testing.assert_array_equal(g.tokens[0], [A, B, C, EOS])
    np.testing.assert_array_equal(b.tokens[0], [A, C, B, EOS])
    assert int(b.lengths[0]) == 3
    np.testing.assert_allclose(float(b.scores[0]), math.log(0.054) / 4**alpha, rtol=1e-4)
    # aux is reordered with the beams: previous tokens of the winning beam
    np.testing.assert_array_equal(b.aux[0, :, 1], [BOS, A, C, B])


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_size_one_equals_greedy(seed):
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.full(5, 0.5), size=(6, 5))
    g = run(greedy_search, table, 3, max_len=6)
    b = run(beam_search, table, 3, max_len=6, beam_size=1, alpha=0.0)
    np.testing.assert_array_equal(g.tokens, b.tokens)
    np.testing.assert_array_equal(g.lengths, b.lengths)
    np.testing.assert_allclose(g.scores, b.scores, rtol=1e-5)
    np.testing.assert_allclose(g.aux, b.aux)


@pytest.mark.parametrize("seed,alpha", [(0, 0.0), (1, 0.75), (2, 1.0)])
def test_wide_beam_equals_exhaustive_search(seed, alpha):
    rng = np.random.default_rng(seed)
    v, max_len = 4, 3
    table = rng.dirichlet(np.full(v, 0.7), size=(max_len, v))
    best, seq = brute_force_best(table, max_len, alpha)
    r = run(beam_search, table, 1, max_len=max_len, beam_size=v**max_len + 4, alpha=alpha)
    n = len(seq)
    np.testing.assert_array_equal(r.tokens[0, :n], seq)
    assert (np.asarray(r.tokens[0, n:]) == -1).all()
    assert int(r.lengths[0]) == (n - 1 if seq[-1] == EOS else n)
    np.testing.assert_allclose(float(r.scores[0]), best, rtol=1e-4)


def test_fixed_shapes_under_jit():
    dec = table_decoder(hand_table())

    @jax.jit
    def decode(state):
        g = greedy_search(dec, {}, state, bos_id=BOS, eos_id=EOS, max_len=5)
        b, allb = beam_search(dec, {}, state, bos_id=BOS, eos_id=EOS, max_len=5, beam_size=3,
                              return_all=True)
        return g, b, allb

    g, b, allb = decode(_state(3))
    assert g.aux is None
    assert g.tokens.shape == b.tokens.shape == (3, 5)
    assert g.lengths.shape == b.lengths.shape == (3,)
    assert allb.tokens.shape == (3, 3, 5) and allb.scores.shape == (3, 3)
    assert (np.diff(np.asarray(allb.scores), axis=1) <= 1e-6).all()  # sorted best first
    # after <eos>, only padding
    for row, n in zip(np.asarray(b.tokens), np.asarray(b.lengths)):
        if n < 5:
            assert row[n] == EOS and (row[n + 1:] == -1).all()


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_beam_size(k):
    with pytest.raises(ValueError, match="beam_size"):
        run(beam_search, hand_table(), 1, max_len=4, beam_size=k)


def test_bad_max_len_and_state():
    with pytest.raises(ValueError, match="max_len"):
        run(greedy_search, hand_table(), 1, max_len=0)
    bad = {"t": jnp.zeros((2,), jnp.int32), "last": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match="batch axis first"):
        greedy_search(table_decoder(hand_table()), {}, bad, bos_id=BOS, eos_id=EOS, max_len=3)


# ----------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed():
    # identical sentences
    assert bleu("va !", "va !", k=2) == pytest.approx(1.0)
    # d2l's printed example: "il est riche ." vs "il est calme .": p1 = 3/4, p2 = 1/3
    assert bleu("il est riche .", "il est calme .", k=2) == pytest.approx(
        (3 / 4) ** 0.5 * (1 / 3) ** 0.25
    )
    # brevity penalty: pred 2 tokens, label 4: exp(1 - 4/2); p1 = 2/2, p2 = 1/1
    assert bleu("je suis", "je suis chez moi", k=2) == pytest.approx(math.exp(-1.0))
    # clipped counts: "le le le" vs "le chat": p1 = 1/3, p2 = 0 -> 0
    assert bleu("le le le", "le chat", k=2) == 0.0
    assert bleu("le le le", "le chat", k=1) == pytest.approx((1 / 3) ** 0.5)
    # longer prediction than label: no penalty; k larger than the prediction stops at len_pred
    assert bleu(["a", "b"], ["a", "b"], k=4) == pytest.approx(1.0)
    assert bleu("", "a b", k=2) == 0.0
    with pytest.raises(ValueError):
        bleu("a", "a", k=0)


def test_bleu_matches_d2l_reference_implementation():
    import collections

    def d2l_bleu(pred_seq, label_seq, k):  # verbatim from the book
        pred_tokens, label_tokens = pred_seq.split(" "), label_seq.split(" ")
        len_pred, len_label = len(pred_tokens), len(label_tokens)
        score = math.exp(min(0, 1 - len_label / len_pred))
        for n in range(1, k + 1):
            num_matches, label_subs = 0, collections.defaultdict(int)
            for i in range(len_label - n + 1):
                label_subs[" ".join(label_tokens[i : i + n])] += 1
            for i in range(len_pred - n + 1):
                if label_subs[" ".join(pred_tokens[i : i + n])] > 0:
                    num_matches += 1
                    label_subs[" ".join(pred_tokens[i : i + n])] -= 1
            score *= math.pow(num_matches / (len_pred - n + 1), math.pow(0.5, n))
        return score

    rng = np.random.default_rng(0)
    words = ["a", "b", "c", "d"]
    for _ in range(50):
        p = " ".join(rng.choice(words, size=rng.integers(3, 7)))
        lab = " ".join(rng.choice(words, size=rng.integers(1, 7)))
        assert bleu(p, lab, 2) == pytest.approx(d2l_bleu(p, lab, 2))
        assert bleu(p, lab, 3) == pytest.approx(d2l_bleu(p, lab, 3))
