"""BERT pretraining data: packing, NSP pairs, the 80/10/10 masking, padding, readers."""

import os

import numpy as np
import pytest

from fdl.data.bert import (
    bert_pretraining_data,
    read_paragraphs,
    read_text_paragraphs,
    tokens_and_segments,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def _paragraphs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    return [[" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(rng.integers(2, 5))]
            for _ in range(n)]


def test_tokens_and_segments():
    t, s = tokens_and_segments(["a", "b"], ["c"])
    assert t == ["<cls>", "a", "b", "<sep>", "c", "<sep>"] and s == [0, 0, 0, 0, 1, 1]
    t, s = tokens_and_segments(["a"])
    assert t == ["<cls>", "a", "<sep>"] and s == [0, 0, 0]


def test_examples_masking_and_padding():
    paras = _paragraphs()
    arr, vocab = bert_pretraining_data(paras, 20, seed=1, min_freq=1)
    n = arr["tokens"].shape[0]
    assert arr["pred_positions"].shape == (n, 3) and arr["tokens"].shape == (n, 20)
    assert 0.3 < arr["nsp_labels"].mean() < 0.7
    pad, mask_id = vocab["<pad>"], vocab["<mask>"]
    cls, sep = vocab["<cls>"], vocab["<sep>"]
    kept = masked = random = 0
    for i in range(n):
        v = arr["valid_lens"][i]
        assert (arr["tokens"][i, v:] == pad).all() and arr["tokens"][i, 0] == cls
        assert (arr["segments"][i, v:] == 0).all()
        k = int(arr["mlm_weights"][i].sum())
        assert k == max(1, round(v * 0.15)) or k == 3
        pos = arr["pred_positions"][i, :k]
        assert (pos > 0).all() and (pos < v).all()
        got = arr["tokens"][i, pos]
        assert not np.isin(arr["mlm_labels"][i, :k], [cls, sep]).any()
        masked += int((got == mask_id).sum())
        kept += int((got == arr["mlm_labels"][i, :k]).sum())
        random += int(((got != mask_id) & (got != arr["mlm_labels"][i, :k])).sum())
    total = masked + kept + random
    assert 0.72 < masked / total < 0.88  # 80% <mask>; the rest split unchanged / random
    assert kept > 0 and random > 0
    again, _ = bert_pretraining_data(paras, 20, seed=1, min_freq=1)
    for k in arr:
        np.testing.assert_array_equal(arr[k], again[k])  # deterministic for a seed


def test_readers_and_errors(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("The time machine. It was late!\n\nOne sentence only\n\nA b. C d? E f.\n")
    paras = read_text_paragraphs(f)
    assert paras == [["the time machine", "it was late"], ["a b", "c d", "e f"]]
    with pytest.raises(FileNotFoundError, match="timemachine"):
        read_paragraphs(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="max_len"):
        bert_pretraining_data(paras, 3)
    path = os.path.join(DATA, "timemachine.txt")
    if os.path.exists(path):
        paras, desc = read_paragraphs(path)
        assert len(paras) > 200 and desc == "timemachine.txt"
