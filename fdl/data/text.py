"""Text pipeline of *Dive into Deep Learning* (chapter 8): corpus, tokens, ``Vocab``, samplers.

The corpus is read from a path the caller gives (the project ships no copy; from the project's
root the book's text is ``../shared/data/timemachine.txt``)::

    loader, vocab = load_data_time_machine("../shared/data/timemachine.txt", 32, 35)
    for X, Y in loader:          # int32 numpy arrays (batch_size, num_steps); Y is X shifted by one
        ...

Samplers (the book's two):

- :func:`seq_data_iter_random` -- random sampling: each minibatch holds ``batch_size``
  subsequences taken at random non-overlapping positions; adjacent minibatches are unrelated.
- :func:`seq_data_iter_sequential` -- sequential partitioning: row ``i`` of minibatch ``t + 1``
  continues row ``i`` of minibatch ``t``, so a recurrent state may be carried across minibatches.

Randomness (the random start offset and the shuffle) comes from ``seed``: an ``int``, a
``numpy.random.Generator`` or a ``jax.random`` key (typed or raw); the same seed gives the same
minibatches.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TIME_MACHINE_PATH",
    "SeqDataLoader",
    "Vocab",
    "count_corpus",
    "lm_arrays",
    "load_corpus_time_machine",
    "load_data_time_machine",
    "preprocess_line",
    "read_lines",
    "read_time_machine",
    "seq_data_iter_random",
    "seq_data_iter_sequential",
    "tokenize",
]

DEFAULT_TIME_MACHINE_PATH = "../shared/data/timemachine.txt"

_NON_LETTERS = re.compile("[^A-Za-z]+")


# ----------------------------------------------------------------------------- reading


def read_lines(path: str | os.PathLike) -> list[str]:
    """Read a text file (UTF-8) and return its lines without line endings.

    Raises ``FileNotFoundError`` naming the path if it does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"text corpus not found at {path!r} (cwd {os.getcwd()!r}); The Time Machine lives "
            f"at {DEFAULT_TIME_MACHINE_PATH!r} relative to the project's root"
        )
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def preprocess_line(line: str) -> str:
    """d2l's preprocessing: every run of non-letters becomes one space; strip; lower case."""
    return _NON_LETTERS.sub(" ", line).strip().lower()


def read_time_machine(path: str | os.PathLike = DEFAULT_TIME_MACHINE_PATH) -> list[str]:
    """The book's ``read_time_machine``: the file's lines, preprocessed (letters and spaces)."""
    return [preprocess_line(line) for line in read_lines(path)]


def tokenize(lines: Iterable[str], token: str = "word") -> list[list[str]]:
    """Split each line into word tokens (``token="word"``) or characters (``"char"``)."""
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"tokenize: token must be 'word' or 'char', got {token!r}")


def count_corpus(tokens: Iterable[Any]) -> collections.Counter:
    """Token frequencies; ``tokens`` is a flat list or a list of token lists (lines)."""
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], (list, tuple)):
        tokens = [t for line in tokens for t in line]
    return collections.Counter(tokens)


# ----------------------------------------------------------------------------- vocabulary


class Vocab:
    """Token <-> index mapping, as the book's ``Vocab``.

    ``<unk>`` has index 0, then ``reserved_tokens`` (e.g. ``("<pad>", "<bos>", "<eos>")``) in
    the order given, then the remaining tokens by decreasing frequency (ties: first occurrence
    first). Tokens seen fewer than ``min_freq`` times are left out (they map to ``<unk>``).

    ``vocab[token]`` / ``vocab[list_of_tokens]`` give indices (unknown tokens give ``unk`` = 0);
    ``vocab.to_tokens(index_or_indices)`` the reverse. ``token_freqs`` is the list of
    ``(token, count)`` pairs sorted by decreasing count.
    """

    unk: int = 0

    def __init__(
        self,
        tokens: Iterable[Any] = (),
        min_freq: int = 0,
        reserved_tokens: Sequence[str] = (),
    ):
        if not isinstance(min_freq, int) or isinstance(min_freq, bool) or min_freq < 0:
            raise ValueError(f"Vocab: min_freq must be an integer >= 0, got {min_freq!r}")
        reserved = list(reserved_tokens or ())
        if "<unk>" in reserved:
            raise ValueError("Vocab: '<unk>' is always index 0; do not list it in reserved_tokens")
        if len(set(reserved)) != len(reserved):
            raise ValueError(f"Vocab: duplicate reserved tokens {reserved}")
        counter = count_corpus(tokens)
        if not counter:
            raise ValueError(
                "Vocab: cannot build a vocabulary from an empty corpus (no tokens); check the "
                "path and the preprocessing"
            )
        self._token_freqs = sorted(counter.items(), key=lambda kv: kv[1], reverse=True)
        self.idx_to_token: list[str] = ["<unk>", *reserved]
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.idx_to_token)}
        for tok, freq in self._token_freqs:
            if freq < min_freq:
                break
            if tok not in self.token_to_idx:
                self.token_to_idx[tok] = len(self.idx_to_token)
                self.idx_to_token.append(tok)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __contains__(self, token: Any) -> bool:
        return token in self.token_to_idx

    def __getitem__(self, tokens: Any) -> Any:
        if isinstance(tokens, (list, tuple)):
            return [self[t] for t in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, indices: Any) -> Any:
        """Index (int) -> token; list/tuple/array of indices -> list of tokens."""
        if isinstance(indices, np.ndarray) or hasattr(indices, "__array__"):
            arr = np.asarray(indices)
            if arr.ndim == 0:
                return self.idx_to_token[int(arr)]
            return [self.to_tokens(i) for i in arr.tolist()]
        if isinstance(indices, (list, tuple)):
            return [self.to_tokens(i) for i in indices]
        return self.idx_to_token[int(indices)]

    @property
    def token_freqs(self) -> list[tuple[str, int]]:
        return list(self._token_freqs)

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self.idx_to_token[:8])
        return f"Vocab(size={len(self)}, tokens=[{head}{', ...' if len(self) > 8 else ''}])"


# ----------------------------------------------------------------------------- corpora


def load_corpus_time_machine(
    path: str | os.PathLike = DEFAULT_TIME_MACHINE_PATH, max_tokens: int = -1
) -> tuple[list[int], Vocab]:
    """Character indices of The Time Machine and its character vocabulary (28 entries: ``<unk>``,
    space and 26 letters). ``max_tokens > 0`` keeps the first ``max_tokens`` indices (the
    vocabulary is built from the whole text, as the book does)."""
    tokens = tokenize(read_time_machine(path), "char")
    vocab = Vocab(tokens)
    corpus = [vocab[t] for line in tokens for t in line]
    if max_tokens > 0:
        corpus = corpus[:max_tokens]
    return corpus, vocab


# ----------------------------------------------------------------------------- samplers


def _rng(seed: Any) -> np.random.Generator:
    """A numpy Generator from an int, None, a Generator or a jax.random key."""
    if isinstance(seed, (np.random.Generator, _FixedOffset)):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    import jax  # a jax key: derive the numpy seed from its bits

    arr = seed
    if jax.dtypes.issubdtype(getattr(arr, "dtype", None), jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    bits = np.asarray(arr).astype(np.uint64).ravel().tolist()
    return np.random.default_rng(bits)


def _check_sampler_args(corpus: Sequence[int], batch_size: int, num_steps: int) -> np.ndarray:
    for name, v in (("batch_size", batch_size), ("num_steps", num_steps)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"sequence sampler: {name} must be an integer >= 1, got {v!r}")
    corpus = np.asarray(corpus, dtype=np.int32)
    if corpus.ndim != 1:
        raise ValueError(f"sequence sampler: corpus must be a flat list of indices, got "
                         f"shape {corpus.shape}")
    need = batch_size * num_steps + num_steps + 1
    if corpus.size < need:
        raise ValueError(
            f"sequence sampler: the corpus has {corpus.size} tokens, shorter than one minibatch "
            f"(batch_size * num_steps + num_steps + 1 = {batch_size}*{num_steps}+{num_steps}+1 "
            f"= {need} tokens are needed); use a smaller batch_size/num_steps or more text"
        )
    return corpus


def seq_data_iter_random(
    corpus: Sequence[int], batch_size: int, num_steps: int, seed: Any = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Random sampling: yield ``(X, Y)`` int32 arrays of shape ``(batch_size, num_steps)`` with
    ``Y`` = ``X`` shifted one token ahead. After a random start offset in ``[0, num_steps)``,
    the corpus is cut into non-overlapping subsequences which are shuffled and dealt out in
    minibatches; every subsequence is used at most once per pass.
    """
    corpus = _check_sampler_args(corpus, batch_size, num_steps)
    rng = _rng(seed)
    corpus = corpus[int(rng.integers(0, num_steps)):]
    num_subseqs = (corpus.size - 1) // num_steps
    starts = np.arange(0, num_subseqs * num_steps, num_steps)
    rng.shuffle(starts)
    num_batches = num_subseqs // batch_size
    offs = np.arange(num_steps)
    for i in range(0, batch_size * num_batches, batch_size):
        idx = starts[i : i + batch_size, None] + offs[None, :]
        yield corpus[idx], corpus[idx + 1]


def seq_data_iter_sequential(
    corpus: Sequence[int], batch_size: int, num_steps: int, seed: Any = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sequential partitioning: after a random start offset in ``[0, num_steps]``, the corpus is
    split into ``batch_size`` contiguous rows; minibatch ``t`` holds columns
    ``[t*num_steps, (t+1)*num_steps)``, so row ``i`` of minibatch ``t + 1`` continues row ``i``
    of minibatch ``t``. Yields int32 ``(X, Y)`` of shape ``(batch_size, num_steps)``.
    """
    corpus = _check_sampler_args(corpus, batch_size, num_steps)
    rng = _rng(seed)
    offset = int(rng.integers(0, num_steps + 1))
    num_tokens = ((corpus.size - offset - 1) // batch_size) * batch_size
    xs = corpus[offset : offset + num_tokens].reshape(batch_size, -1)
    ys = corpus[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)
    num_batches = xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


def lm_arrays(
    corpus: Sequence[int], batch_size: int, num_steps: int, *, random_iter: bool = False,
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The minibatches of one pass of the book's samplers as two int32 arrays ``(X, Y)`` of shape
    ``(num_batches * batch_size, num_steps)``, for an :class:`~fdl.data.ArrayLoader` (and so
    :func:`fdl.train.fit`) with the given ``batch_size``:

    - ``random_iter=False`` (sequential partitioning): rows ``[t*batch_size, (t+1)*batch_size)``
      are minibatch ``t`` of :func:`seq_data_iter_sequential` started at ``offset``, so an
      unshuffled loader (``key=None``) yields the sequential minibatches in order and row ``i``
      of batch ``t + 1`` continues row ``i`` of batch ``t`` (carry the recurrent state);
    - ``random_iter=True``: every non-overlapping subsequence from ``offset`` (the book's random
      sampling when the loader shuffles, ``last_batch="drop"``).

    ``offset`` is fixed here (the book's samplers draw a new one every epoch)."""
    corpus = _check_sampler_args(corpus, batch_size, num_steps)
    if not 0 <= offset <= num_steps:
        raise ValueError(f"lm_arrays: offset must be in [0, {num_steps}], got {offset!r}")
    if random_iter:
        corpus = corpus[offset:]
        n = (corpus.size - 1) // num_steps
        idx = np.arange(n)[:, None] * num_steps + np.arange(num_steps)[None, :]
        return corpus[idx], corpus[idx + 1]
    xs, ys = zip(*seq_data_iter_sequential(corpus[offset:], batch_size, num_steps,
                                           _FixedOffset()), strict=True)
    return np.concatenate(xs), np.concatenate(ys)


class _FixedOffset:
    """A stand-in generator whose ``integers`` draws 0 (no further random offset)."""

    def integers(self, low, high=None):
        return 0


class SeqDataLoader:
    """Iterable over ``(X, Y)`` minibatches of a token-index corpus (the book's
    ``SeqDataLoader``). Each ``iter(loader)`` is one pass (epoch) with a fresh random offset
    (and shuffle) drawn from a generator seeded once by ``seed``, so a run is reproducible.
    ``loader.epoch(seed)`` gives one pass keyed explicitly (e.g. by a ``jax.random`` key).
    """

    def __init__(
        self,
        corpus: Sequence[int],
        batch_size: int,
        num_steps: int,
        use_random_iter: bool = False,
        seed: Any = 0,
    ):
        self.corpus = _check_sampler_args(corpus, batch_size, num_steps)
        self.batch_size = int(batch_size)
        self.num_steps = int(num_steps)
        self.use_random_iter = bool(use_random_iter)
        self._fn = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
        self._rng = _rng(seed)

    def epoch(self, seed: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._fn(self.corpus, self.batch_size, self.num_steps, seed)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._fn(self.corpus, self.batch_size, self.num_steps, self._rng)

    def __len__(self) -> int:
        """Number of minibatches in the shortest possible pass."""
        n, b, s = self.corpus.size, self.batch_size, self.num_steps
        if self.use_random_iter:
            return ((n - s) // s) // b
        return ((n - s - 1) // b) // s


def load_data_time_machine(
    path: str | os.PathLike,
    batch_size: int,
    num_steps: int,
    use_random_iter: bool = False,
    max_tokens: int = 10000,
    seed: Any = 0,
) -> tuple[SeqDataLoader, Vocab]:
    """The book's ``load_data_time_machine``: a :class:`SeqDataLoader` over the first
    ``max_tokens`` characters of The Time Machine (book setting 10000) and the vocabulary."""
    corpus, vocab = load_corpus_time_machine(path, max_tokens)
    return SeqDataLoader(corpus, batch_size, num_steps, use_random_iter, seed), vocab
