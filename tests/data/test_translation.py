"""fra-eng pipeline: preprocessing, tokenisation, padding / valid_len, loader, bad input."""

import os
import zipfile

import jax
import numpy as np
import pytest

from fdl.data.text import Vocab
from fdl.data.translation import (
    NMTData,
    build_array_nmt,
    load_data_nmt,
    preprocess_nmt,
    read_data_nmt,
    tokenize_nmt,
    truncate_pad,
)

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "fra-eng.zip")

RAW = (
    "Go.\tVa !\n"
    "Hi.\tSalut !\n"
    "Run!\tCours\u202f!\n"
    "Run!\tCourez\u202f!\n"
    "I lost.\tJ'ai perdu.\n"
    "Go now, please.\tVa maintenant,\xa0s'il te plaît.\n"
    "bad line without tab\n"
)


def test_preprocess_matches_d2l():
    text = preprocess_nmt(RAW)
    lines = text.split("\n")
    assert lines[0] == "go .\tva !"
    assert lines[2] == "run !\tcours !"  # narrow nbsp -> space; no double space before '!'
    assert lines[5] == "go now , please .\tva maintenant , s'il te plaît ."
    assert preprocess_nmt("A,b") == "a ,b"


def test_tokenize_and_num_examples():
    src, tgt = tokenize_nmt(preprocess_nmt(RAW))
    assert len(src) == len(tgt) == 6  # the malformed line is skipped
    assert src[0] == ["go", "."] and tgt[4] == ["j'ai", "perdu", "."]
    src2, _ = tokenize_nmt(preprocess_nmt(RAW), num_examples=3)
    assert src2 == src[:3]
    with pytest.raises(ValueError):
        tokenize_nmt("a\tb", num_examples=0)


def test_truncate_pad():
    assert truncate_pad([1, 2, 3], 5, 0) == [1, 2, 3, 0, 0]
    assert truncate_pad([1, 2, 3, 4, 5, 6], 4, 0) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_steps"):
        truncate_pad([1], 0, 0)


def test_build_array_eos_padding_and_valid_len():
    src, _ = tokenize_nmt(preprocess_nmt(RAW))
    vocab = Vocab(src, min_freq=1, reserved_tokens=["<pad>", "<bos>", "<eos>"])
    pad, eos = vocab["<pad>"], vocab["<eos>"]
    assert (vocab["<unk>"], pad, vocab["<bos>"], eos) == (0, 1, 2, 3)
    arr, vl = build_array_nmt(src, vocab, 4)
    assert arr.shape == (6, 4) and arr.dtype == np.int32 and vl.dtype == np.int32
    np.testing.assert_array_equal(arr[0], [vocab["go"], vocab["."], eos, pad])
    assert vl[0] == 3
    # "go now , please ." + <eos> has 6 tokens: truncated to 4, <eos> cut off
    np.testing.assert_array_equal(arr[5], vocab[["go", "now", ",", "please"]])
    assert vl[5] == 4
    # unknown tokens map to <unk>
    arr2, _ = build_array_nmt([["zzz", "go"]], vocab, 4)
    np.testing.assert_array_equal(arr2[0], [0, vocab["go"], eos, pad])


def write_zip(tmp_path, text, member="fra-eng/fra.txt"):
    p = tmp_path / "fra-eng.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(member, text)
    return p


def test_read_zip_and_extracted_file(tmp_path):
    p = write_zip(tmp_path, RAW)
    assert read_data_nmt(p) == RAW
    f = tmp_path / "fra.txt"
    f.write_text(RAW, encoding="utf-8")
    assert read_data_nmt(f) == RAW
    bad = write_zip(tmp_path, RAW, member="other.txt")
    with pytest.raises(FileNotFoundError, match="fra.txt"):
        read_data_nmt(bad)


def test_missing_file_names_path_and_source(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(FileNotFoundError) as e:
        load_data_nmt(missing, 2, 5)
    assert str(missing) in str(e.value) and "fra-eng.zip" in str(e.value)


def test_loader_batches_cover_everything_and_shuffle_by_key(tmp_path):
    p = write_zip(tmp_path, RAW * 3)
    data, src_vocab, tgt_vocab = load_data_nmt(p, batch_size=4, num_steps=6, num_examples=None)
    n = data.src.shape[0]
    assert n == 18 and len(data) == 5
    batches = list(data.batches(jax.random.key(1)))
    assert [b[0].shape for b in batches] == [(4, 6)] * 4 + [(2, 6)]
    for X, X_vl, Y, Y_vl in batches:
        assert X_vl.shape == (X.shape[0],) and Y.shape == X.shape and Y_vl.shape == X_vl.shape
        np.testing.assert_array_equal(X_vl, (X != src_vocab["<pad>"]).sum(1))
        np.testing.assert_array_equal(Y_vl, (Y != tgt_vocab["<pad>"]).sum(1))
    got = np.concatenate([b[0] for b in batches])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, data.src.tolist()))
    again = np.concatenate([b[0] for b in data.batches(jax.random.key(1))])
    np.testing.assert_array_equal(got, again)  # same key, same order
    other = np.concatenate([b[0] for b in data.batches(jax.random.key(2))])
    assert not np.array_equal(got, other)
    assert sum(1 for _ in NMTData(data.src, data.src_valid_len, data.tgt, data.tgt_valid_len,
                                  4, drop_last=True).batches(0)) == 4
    with pytest.raises(ValueError, match="num_steps"):
        load_data_nmt(p, 4, 0)


@pytest.mark.skipif(not os.path.isfile(REAL), reason="fra-eng.zip not available")
def test_real_fra_eng_book_numbers():
    data, src_vocab, tgt_vocab = load_data_nmt(REAL, batch_size=64, num_steps=10)
    assert data.src.shape == (600, 10)
    assert len(src_vocab) == 184  # the book prints 184 for its source vocabulary
    assert src_vocab[["go", "."]] != [0, 0]
    X, X_vl, Y, Y_vl = next(iter(data))
    assert X.shape == (64, 10) and (X_vl >= 2).all() and (X_vl <= 10).all()
