"""Text pipeline: preprocessing, tokenization, Vocab, samplers, The Time Machine loader."""

import os

import jax
import numpy as np
import pytest

from fdl.data import text as T

TM = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                  "timemachine.txt")
needs_tm = pytest.mark.skipif(not os.path.isfile(TM), reason="timemachine.txt not present")


def test_preprocess_and_tokenize():
    assert T.preprocess_line("  The Time-Traveller, (for so...) 1898!  ") == \
        "the time traveller for so"
    assert T.tokenize(["ab c"], "char") == [["a", "b", " ", "c"]]
    assert T.tokenize(["ab  c", ""], "word") == [["ab", "c"], []]
    with pytest.raises(ValueError, match="word' or 'char"):
        T.tokenize(["x"], "byte")


def test_vocab_order_lookup_and_reverse():
    lines = [["b", "a", "c"], ["a", "a", "b", "d"]]
    v = T.Vocab(lines, reserved_tokens=("<pad>", "<bos>", "<eos>"))
    assert v.idx_to_token == ["<unk>", "<pad>", "<bos>", "<eos>", "a", "b", "c", "d"]
    assert len(v) == 8 and v.unk == 0
    assert v["a"] == 4 and v["zzz"] == 0 and v[["d", "nope", "<eos>"]] == [7, 0, 3]
    assert v.to_tokens(5) == "b" and v.to_tokens([4, 0]) == ["a", "<unk>"]
    assert v.to_tokens(np.array([7, 6])) == ["d", "c"]
    assert v.token_to_idx == {t: i for i, t in enumerate(v.idx_to_token)}
    assert v.token_freqs[:2] == [("a", 3), ("b", 2)]
    # min_freq drops rare tokens (they become <unk>)
    v2 = T.Vocab(lines, min_freq=2)
    assert v2.idx_to_token == ["<unk>", "a", "b"] and v2["c"] == 0


def test_vocab_bad_inputs():
    with pytest.raises(ValueError, match="empty corpus"):
        T.Vocab([])
    with pytest.raises(ValueError, match="empty corpus"):
        T.Vocab([[], []])
    with pytest.raises(ValueError, match="min_freq"):
        T.Vocab(["a"], min_freq=-1)
    with pytest.raises(ValueError, match="<unk>"):
        T.Vocab(["a"], reserved_tokens=["<unk>"])


def test_missing_corpus_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as e:
        T.load_corpus_time_machine(missing)
    assert str(missing) in str(e.value) and "../shared/data/timemachine.txt" in str(e.value)


@needs_tm
def test_time_machine_corpus_matches_the_book():
    corpus, vocab = T.load_corpus_time_machine(TM)
    assert len(corpus) == 170580 and len(vocab) == 28
    assert vocab.idx_to_token[:5] == ["<unk>", " ", "e", "t", "a"]
    corpus10k, _ = T.load_corpus_time_machine(TM, max_tokens=10000)
    assert corpus10k == corpus[:10000]
    assert "".join(vocab.to_tokens(corpus[:14])) == "the time machi"


def _check_shifted(X, Y, corpus):
    text = np.asarray(corpus)
    for x, y in zip(X, Y):
        # locate the row in the corpus and check Y is X shifted by one
        starts = np.flatnonzero(np.all(
            np.lib.stride_tricks.sliding_window_view(text, len(x)) == x, axis=1))
        assert any(np.array_equal(text[s + 1 : s + 1 + len(x)], y) for s in starts)


def test_sequential_minibatches_continue_each_other():
    corpus = list(range(1000))
    batches = list(T.seq_data_iter_sequential(corpus, 4, 7, seed=3))
    assert len(batches) >= 2
    for X, Y in batches:
        assert X.shape == Y.shape == (4, 7) and X.dtype == np.int32
        np.testing.assert_array_equal(Y, X + 1)
    for (X0, _), (X1, _) in zip(batches, batches[1:]):
        np.testing.assert_array_equal(X1[:, 0], X0[:, -1] + 1)  # row i continues row i


def test_random_sampling_covers_without_overlap():
    corpus = list(range(500))
    B, S = 3, 5
    batches = list(T.seq_data_iter_random(corpus, B, S, seed=jax.random.key(1)))
    starts = np.concatenate([X[:, 0] for X, _ in batches])
    for X, Y in batches:
        assert X.shape == (B, S)
        np.testing.assert_array_equal(Y, X + 1)
        np.testing.assert_array_equal(X, X[:, :1] + np.arange(S))
    # non-overlapping subsequences on one grid, each used once, covering all but < B*S + S tokens
    assert len(set(starts.tolist())) == len(starts)
    assert len(set((starts % S).tolist())) == 1
    assert len(starts) * S > len(corpus) - B * S - S - 1
    # shuffled: not in corpus order; same seed -> same batches; other seed -> other batches
    assert not np.all(np.diff(starts) > 0)
    again = list(T.seq_data_iter_random(corpus, B, S, seed=jax.random.key(1)))
    np.testing.assert_array_equal(np.stack([x for x, _ in again]), np.stack([x for x, _ in
                                                                             batches]))
    other = np.stack([x for x, _ in T.seq_data_iter_random(corpus, B, S, seed=2)])
    assert not np.array_equal(other, np.stack([x for x, _ in batches]))


def test_sampler_bad_inputs():
    for fn in (T.seq_data_iter_random, T.seq_data_iter_sequential):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            list(fn(range(100), 2, 0))
        with pytest.raises(ValueError, match="batch_size"):
            list(fn(range(100), 0, 3))
        with pytest.raises(ValueError, match="shorter than one minibatch"):
            list(fn(range(20), 4, 5))
    # exactly long enough: one minibatch for any offset
    for seed in range(5):
        assert len(list(T.seq_data_iter_sequential(range(4 * 5 + 5 + 1), 4, 5, seed))) >= 1
        assert len(list(T.seq_data_iter_random(range(4 * 5 + 5 + 1), 4, 5, seed))) >= 1


@needs_tm
def test_load_data_time_machine_book_setting():
    loader, vocab = T.load_data_time_machine(TM, 32, 35)
    assert len(vocab) == 28
    e1 = list(loader)
    e2 = list(loader)
    assert len(e1) == 8 and len(loader) <= len(e1)
    assert all(X.shape == (32, 35) for X, _ in e1)
    corpus, _ = T.load_corpus_time_machine(TM, 10000)
    _check_shifted(e1[0][0][:2], e1[0][1][:2], corpus)
    # a new pass draws a new offset (with overwhelming probability over 2 passes and 36 offsets)
    e3 = list(loader)
    assert not (np.array_equal(e1[0][0], e2[0][0]) and np.array_equal(e1[0][0], e3[0][0]))
    # same seed -> same passes
    l2, _ = T.load_data_time_machine(TM, 32, 35)
    np.testing.assert_array_equal(next(iter(l2))[0], e1[0][0])
    rl, _ = T.load_data_time_machine(TM, 32, 35, use_random_iter=True)
    assert rl.use_random_iter and all(X.shape == (32, 35) for X, _ in rl)
