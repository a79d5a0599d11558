"""English–French machine-translation data of *Dive into Deep Learning* (section "Machine
Translation and the Dataset").

The pairs are read from a path the caller gives: the zip the book downloads
(``../shared/data/fra-eng.zip`` from the project's root, member ``fra-eng/fra.txt``) or an
extracted ``fra.txt`` (tab-separated ``english<TAB>french`` lines)::

    data, src_vocab, tgt_vocab = load_data_nmt("../shared/data/fra-eng.zip", 64, 10)
    for X, X_valid_len, Y, Y_valid_len in data.batches(jax.random.key(0)):
        ...   # int32 numpy arrays (batch, num_steps) and (batch,)

Preprocessing, tokenisation and array building follow the book exactly: non-breaking spaces
become spaces, a space is inserted before ``, . ! ?`` not already preceded by one, text is lower
cased; tokens are split on single spaces; vocabularies use ``min_freq=2`` and the reserved tokens
``<pad> <bos> <eos>`` (after ``<unk>`` = 0, so ``<pad>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3);
``<eos>`` is appended to every sentence, which is then truncated or padded to ``num_steps``
(a sentence longer than ``num_steps`` loses its tail, ``<eos>`` included); ``valid_len`` counts
the non-``<pad>`` tokens. ``num_examples=600`` reads the first 600 lines (d2l's ``i >
num_examples`` test reads 601; we take exactly ``num_examples`` pairs).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fdl.data.text import Vocab

__all__ = [
    "DEFAULT_FRA_ENG_PATH",
    "NMTData",
    "RESERVED_TOKENS",
    "build_array_nmt",
    "load_data_nmt",
    "preprocess_nmt",
    "read_data_nmt",
    "tokenize_nmt",
    "truncate_pad",
]

DEFAULT_FRA_ENG_PATH = "../shared/data/fra-eng.zip"
RESERVED_TOKENS = ("<pad>", "<bos>", "<eos>")
_ZIP_MEMBER = "fra-eng/fra.txt"


def read_data_nmt(path: str | os.PathLike = DEFAULT_FRA_ENG_PATH) -> str:
    """The raw text of ``fra.txt``, from the zip (member ``fra-eng/fra.txt``, or any member named
    ``fra.txt``) or from an extracted file. Raises ``FileNotFoundError`` naming the path and
    where to get the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"English-French data not found at {path!r} (cwd {os.getcwd()!r}). Pass the zip the "
            f"book uses ({DEFAULT_FRA_ENG_PATH!r} relative to the project's root, i.e. "
            "http://d2l-data.s3-accelerate.amazonaws.com/fra-eng.zip) or an extracted fra.txt"
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            member = _ZIP_MEMBER if _ZIP_MEMBER in names else next(
                (n for n in names if n.rsplit("/", 1)[-1] == "fra.txt"), None)
            if member is None:
                raise FileNotFoundError(f"{path!r} is a zip without a 'fra.txt' member "
                                        f"(members: {names[:5]}...)")
            return zf.read(member).decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def preprocess_nmt(text: str) -> str:
    """d2l's ``preprocess_nmt``: non-breaking spaces -> space, lower case, and a space inserted
    before ``, . ! ?`` unless one precedes it already."""
    text = text.replace("\u202f", " ").replace("\xa0", " ").lower()
    out = [
        " " + ch if i > 0 and ch in ",.!?" and text[i - 1] != " " else ch
        for i, ch in enumerate(text)
    ]
    return "".join(out)


def tokenize_nmt(text: str, num_examples: int | None = None
                 ) -> tuple[list[list[str]], list[list[str]]]:
    """Split preprocessed text into source and target token lists (one pair per line with
    exactly two tab-separated fields; tokens split on single spaces). ``num_examples`` limits
    the number of lines read (``None``: all)."""
    if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
        raise ValueError(f"tokenize_nmt: num_examples must be an integer >= 1 or None, got "
                         f"{num_examples!r}")
    source, target = [], []
    for i, line in enumerate(text.split("\n")):
        if num_examples is not None and i >= num_examples:
            break
        parts = line.split("\t")
        if len(parts) == 2:
            source.append(parts[0].split(" "))
            target.append(parts[1].split(" "))
    return source, target


def truncate_pad(line: Sequence[int], num_steps: int, padding_token: int) -> list[int]:
    """Truncate ``line`` to ``num_steps`` tokens or pad it with ``padding_token`` up to it."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"truncate_pad: num_steps must be an integer >= 1, got {num_steps!r}")
    line = list(line)
    if len(line) > num_steps:
        return line[:num_steps]
    return line + [padding_token] * (num_steps - len(line))


def build_array_nmt(lines: Sequence[Sequence[str]], vocab: Vocab, num_steps: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``(array (n, num_steps) int32, valid_len (n,) int32)``: indices with
    ``<eos>`` appended, truncated/padded with ``<pad>``; ``valid_len`` counts non-pad tokens."""
    pad, eos = vocab["<pad>"], vocab["<eos>"]
    rows = [truncate_pad([*vocab[list(line)], eos], num_steps, pad) for line in lines]
    array = np.asarray(rows, dtype=np.int32).reshape(len(rows), num_steps)
    valid_len = (array != pad).sum(axis=1).astype(np.int32)
    return array, valid_len


def _rng(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    import jax

    arr = seed
    if jax.dtypes.issubdtype(getattr(arr, "dtype", None), jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    return np.random.default_rng(np.asarray(arr).astype(np.uint64).ravel().tolist())


@dataclasses.dataclass
class NMTData:
    """In-memory translation set: ``src``/``tgt`` ``(n, num_steps)`` int32 arrays and their
    valid lengths ``(n,)``. Iterate with :meth:`batches`; ``iter(data)`` is one shuffled pass
    from a generator seeded once by ``seed``."""

    src: np.ndarray
    src_valid_len: np.ndarray
    tgt: np.ndarray
    tgt_valid_len: np.ndarray
    batch_size: int
    shuffle: bool = True
    drop_last: bool = False
    seed: Any = 0

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"NMTData: batch_size must be an integer >= 1, got "
                             f"{self.batch_size!r}")
        n = self.src.shape[0]
        if n == 0:
            raise ValueError("NMTData: no sentence pairs (check the file and num_examples)")
        if self.drop_last and n < self.batch_size:
            raise ValueError(f"NMTData: {n} pairs are fewer than one minibatch of "
                             f"{self.batch_size} with drop_last=True")
        self._rng = _rng(self.seed)

    def __len__(self) -> int:
        n = self.src.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, key: Any = None) -> Iterator[tuple[np.ndarray, ...]]:
        """One pass of ``(X, X_valid_len, Y, Y_valid_len)`` minibatches, shuffled by ``key``
        (an int, a numpy Generator or a ``jax.random`` key; ``None`` with ``shuffle`` uses the
        loader's own generator). The last batch is smaller unless ``drop_last``."""
        n = self.src.shape[0]
        if self.shuffle:
            order = (self._rng if key is None else _rng(key)).permutation(n)
        else:
            order = np.arange(n)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for i in range(0, stop, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.src[idx], self.src_valid_len[idx], self.tgt[idx], self.tgt_valid_len[idx]

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        return self.batches()


def load_data_nmt(
    path: str | os.PathLike,
    batch_size: int,
    num_steps: int,
    num_examples: int | None = 600,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: Any = 0,
) -> tuple[NMTData, Vocab, Vocab]:
    """The book's ``load_data_nmt``: ``(data, src_vocab, tgt_vocab)`` for the first
    ``num_examples`` pairs, every sentence ``<eos>``-terminated and truncated/padded to
    ``num_steps``. ``data`` yields ``(X, X_valid_len, Y, Y_valid_len)`` batches."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"load_data_nmt: num_steps must be an integer >= 1, got {num_steps!r}")
    text = preprocess_nmt(read_data_nmt(path))
    source, target = tokenize_nmt(text, num_examples)
    if not source:
        raise ValueError(f"load_data_nmt: no tab-separated sentence pairs found in {path!r}")
    src_vocab = Vocab(source, min_freq=2, reserved_tokens=RESERVED_TOKENS)
    tgt_vocab = Vocab(target, min_freq=2, reserved_tokens=RESERVED_TOKENS)
    src, src_valid_len = build_array_nmt(source, src_vocab, num_steps)
    tgt, tgt_valid_len = build_array_nmt(target, tgt_vocab, num_steps)
    data = NMTData(src, src_valid_len, tgt, tgt_valid_len, batch_size, shuffle=shuffle,
                   drop_last=drop_last, seed=seed)
    return data, src_vocab, tgt_vocab
