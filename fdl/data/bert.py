"""BERT pretraining data (d2l "The Dataset for Pretraining BERT") from any text.

Readers return **paragraphs**, each a list of sentences (strings):

- :func:`read_wikitext2`: WikiText-2's ``wiki.train.tokens`` as the book reads it (lines with at
  least two ``" . "``-separated sentences, lower-cased);
- :func:`read_text_paragraphs`: a plain-text book such as The Time Machine (paragraphs are
  blank-line separated; sentences end at ``. ! ?``; letters only, lower-cased);
- :func:`read_fra_eng_english`: the English side of ``fra-eng.zip`` in groups of consecutive
  sentences (the pairs of the set are short, so its "paragraphs" are runs of ``group`` lines).

:func:`bert_pretraining_data` builds the vocabulary (``min_freq``; reserved ``<pad> <mask> <cls>
<sep>``) and the examples: sentence pairs from consecutive sentences with 50% random next
sentences (NSP), ``<cls> a <sep> b <sep>`` packing with segments 0/1, pairs longer than
``max_len`` dropped, 15% of the non-special tokens chosen for MLM (at least one) with the
80/10/10 rule (``<mask>`` / a random token / unchanged), everything padded to ``max_len`` with
``valid_lens`` and ``round(0.15 * max_len)`` prediction slots (weights 0 for padding slots).
Deterministic for a given ``seed``.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from fdl.data.text import Vocab

__all__ = [
    "read_wikitext2",
    "read_text_paragraphs",
    "read_fra_eng_english",
    "read_paragraphs",
    "tokens_and_segments",
    "bert_pretraining_data",
    "BERT_RESERVED",
]

BERT_RESERVED = ("<pad>", "<mask>", "<cls>", "<sep>")


def _need(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text for BERT pretraining not found at {path!r} (cwd "
                                f"{os.getcwd()!r}); pass wiki.train.tokens, a .txt book such as "
                                "../shared/data/timemachine.txt, or ../shared/data/fra-eng.zip")
    return path


def read_wikitext2(path: str | os.PathLike) -> list[list[str]]:
    """d2l's ``_read_wiki`` (without its shuffle): paragraphs of >= 2 sentences."""
    with open(_need(path), encoding="utf-8") as f:
        lines = f.readlines()
    return [line.strip().lower().split(" . ") for line in lines
            if len(line.split(" . ")) >= 2]


def _sentences(text: str) -> list[str]:
    text = re.sub(r"[^a-z.!?]+", " ", text.lower())
    return [s.strip() for s in re.split(r"[.!?]+", text) if s.strip()]


def read_text_paragraphs(path: str | os.PathLike) -> list[list[str]]:
    """Paragraphs (blank-line separated) of >= 2 sentences from a plain-text book."""
    with open(_need(path), encoding="utf-8") as f:
        blocks = re.split(r"\n\s*\n", f.read())
    paragraphs = [_sentences(b) for b in blocks]
    return [p for p in paragraphs if len(p) >= 2]


def read_fra_eng_english(path: str | os.PathLike, group: int = 4) -> list[list[str]]:
    """The English sentences of ``fra-eng.zip`` (or ``fra.txt``), ``group`` per paragraph."""
    path = _need(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith("fra.txt"))
            text = zf.read(name).decode("utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    eng = [_sentences(line.split("\t")[0]) for line in text.split("\n") if "\t" in line]
    flat = [" ".join(s) for s in eng if s]
    return [flat[i:i + group] for i in range(0, len(flat) - group + 1, group)]


def read_paragraphs(path: str | os.PathLike) -> tuple[list[list[str]], str]:
    """Pick the reader from the file: ``*.tokens`` (WikiText), ``*.zip`` (fra-eng), else a
    plain-text book. Returns ``(paragraphs, description)``."""
    p = os.fspath(path)
    if p.endswith(".tokens"):
        return read_wikitext2(p), f"WikiText-2 ({os.path.basename(p)})"
    if p.endswith(".zip"):
        return read_fra_eng_english(p), "the English side of fra-eng"
    return read_text_paragraphs(p), os.path.basename(p)


def tokens_and_segments(tokens_a: Sequence[str], tokens_b: Sequence[str] | None = None
                        ) -> tuple[list[str], list[int]]:
    """d2l's ``get_tokens_and_segments``: ``<cls> a <sep> [b <sep>]`` and segment ids 0/1."""
    tokens = ["<cls>", *tokens_a, "<sep>"]
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += [*tokens_b, "<sep>"]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def _nsp_pairs(paragraph, paragraphs, max_len, rng):
    out = []
    for i in range(len(paragraph) - 1):
        a, b = paragraph[i], paragraph[i + 1]
        is_next = rng.random() < 0.5
        if not is_next:
            other = paragraphs[rng.integers(len(paragraphs))]
            b = other[rng.integers(len(other))]
        if len(a) + len(b) + 3 > max_len:
            continue
        tokens, segments = tokens_and_segments(a, b)
        out.append((tokens, segments, is_next))
    return out


def _mask_tokens(tokens, vocab, rng):
    """80/10/10 on 15% of the non-special positions; returns (ids, positions, labels)."""
    candidates = [i for i, t in enumerate(tokens) if t not in ("<cls>", "<sep>")]
    num_preds = max(1, round(len(tokens) * 0.15))
    rng.shuffle(candidates)
    out = list(tokens)
    chosen = sorted(candidates[:num_preds])
    for pos in chosen:
        r = rng.random()
        if r < 0.8:
            out[pos] = "<mask>"
        elif r < 0.9:
            out[pos] = vocab.idx_to_token[rng.integers(len(vocab))]
    return vocab[out], chosen, vocab[[tokens[p] for p in chosen]]


def bert_pretraining_data(paragraphs: list[list[str]], max_len: int = 64, *, seed: int = 0,
                          min_freq: int = 5, vocab: Vocab | None = None
                          ) -> tuple[dict[str, np.ndarray], Vocab]:
    """Examples for MLM + NSP pretraining (see the module docstring).

    Returns ``(arrays, vocab)``; ``arrays`` holds int32 ``tokens``, ``segments (N, max_len)``,
    ``valid_lens (N,)``, ``pred_positions``, ``mlm_labels (N, P)``, float32 ``mlm_weights
    (N, P)`` and int32 ``nsp_labels (N,)`` (1 = the real next sentence), ``P =
    round(0.15 * max_len)``."""
    if not isinstance(max_len, int) or max_len < 5:
        raise ValueError(f"bert_pretraining_data: max_len must be an integer >= 5, got "
                         f"{max_len!r}")
    rng = np.random.default_rng(seed)
    tokenized = [[s.split() for s in p] for p in paragraphs]
    tokenized = [[s for s in p if s] for p in tokenized]
    tokenized = [p for p in tokenized if len(p) >= 2]
    if not tokenized:
        raise ValueError("bert_pretraining_data: no paragraph with two or more sentences")
    if vocab is None:
        vocab = Vocab([s for p in tokenized for s in p], min_freq=min_freq,
                      reserved_tokens=BERT_RESERVED)
    examples: list[Any] = []
    for p in tokenized:
        examples += _nsp_pairs(p, tokenized, max_len, rng)
    if not examples:
        raise ValueError(f"bert_pretraining_data: no sentence pair fits max_len {max_len}")
    n, p_slots = len(examples), round(max_len * 0.15)
    arrays = {"tokens": np.full((n, max_len), vocab["<pad>"], np.int32),
              "segments": np.zeros((n, max_len), np.int32),
              "valid_lens": np.zeros((n,), np.int32),
              "pred_positions": np.zeros((n, p_slots), np.int32),
              "mlm_labels": np.zeros((n, p_slots), np.int32),
              "mlm_weights": np.zeros((n, p_slots), np.float32),
              "nsp_labels": np.zeros((n,), np.int32)}
    for i, (tokens, segments, is_next) in enumerate(examples):
        ids, positions, labels = _mask_tokens(tokens, vocab, rng)
        k = min(len(positions), p_slots)
        arrays["tokens"][i, :len(ids)] = ids
        arrays["segments"][i, :len(segments)] = segments
        arrays["valid_lens"][i] = len(ids)
        arrays["pred_positions"][i, :k] = positions[:k]
        arrays["mlm_labels"][i, :k] = labels[:k]
        arrays["mlm_weights"][i, :k] = 1.0
        arrays["nsp_labels"][i] = int(is_next)
    return arrays, vocab
