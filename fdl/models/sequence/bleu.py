"""BLEU exactly as *Dive into Deep Learning* defines it (section "Evaluation of Predicted
Sequences")::

    BLEU = exp(min(0, 1 - len_label / len_pred)) * prod_{n=1}^{k} p_n ** (1 / 2**n)

where ``p_n`` is the clipped ``n``-gram precision of the prediction (matched label ``n``-grams are
used up). As in d2l the product runs to ``min(k, len_pred)``; an empty prediction scores 0 (d2l
divides by zero there).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

__all__ = ["bleu"]


def _tokens(seq: str | Sequence[str]) -> list[str]:
    if isinstance(seq, str):
        return seq.split(" ") if seq else []
    return [str(t) for t in seq]


def bleu(pred_seq: str | Sequence[str], label_seq: str | Sequence[str], k: int) -> float:
    """d2l's BLEU of a predicted against a label sequence (strings split on single spaces,
    or token lists), using n-grams up to ``k``. Returns a float in ``[0, 1]``."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"bleu: k must be an integer >= 1, got {k!r}")
    pred, label = _tokens(pred_seq), _tokens(label_seq)
    len_pred, len_label = len(pred), len(label)
    if len_pred == 0:
        return 0.0
    score = math.exp(min(0.0, 1.0 - len_label / len_pred))
    for n in range(1, min(k, len_pred) + 1):
        num_matches = 0
        label_subs: collections.Counter[tuple[str, ...]] = collections.Counter()
        for i in range(len_label - n + 1):
            label_subs[tuple(label[i:i + n])] += 1
        for i in range(len_pred - n + 1):
            gram = tuple(pred[i:i + n])
            if label_subs[gram] > 0:
                num_matches += 1
                label_subs[gram] -= 1
        score *= math.pow(num_matches / (len_pred - n + 1), math.pow(0.5, n))
    return score
