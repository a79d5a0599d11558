"""Dataset readers: digits, IDX (raw and .gz), CIFAR-10 binary, image folder, download helper."""

import gzip
import os
import struct

import numpy as np
import pytest

from fdl.data import datasets as ds


def _write_idx(path, arr, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)


def test_digits():
    pytest.importorskip("sklearn")
    (xtr, ytr), (xte, yte) = ds.load_digits()
    assert xtr.shape[1:] == (8, 8, 1) and xtr.dtype == np.float32
    assert len(xtr) + len(xte) == 1797 and len(xte) == 359
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0 and ytr.dtype == np.int32
    assert set(np.unique(ytr)) == set(range(10))
    (xtr2, _), _ = ds.load_digits()
    np.testing.assert_array_equal(xtr, xtr2)  # deterministic split


def test_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'fdl\[train\]'"):
        ds.load_digits()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 255, (5, 4, 3)).astype(np.uint8)
    p = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    _write_idx(p, arr, gz)
    np.testing.assert_array_equal(ds.read_idx(p), arr)
    ints = np.arange(-3, 3, dtype=np.int32)
    _write_idx(p, ints, gz)
    np.testing.assert_array_equal(ds.read_idx(p), ints)


def test_read_idx_corrupt(tmp_path):
    p = str(tmp_path / "bad")
    _write_idx(p, np.zeros((4, 2), np.uint8))
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-1])
    with pytest.raises(ds.DatasetError, match="truncated or corrupt"):
        ds.read_idx(p)
    open(p, "wb").write(b"hello world")
    with pytest.raises(ds.DatasetError, match="not an IDX file"):
        ds.read_idx(p)


def test_load_mnist_from_directory(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), gz=True)
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"),
                   rng.integers(0, 10, n).astype(np.uint8))
    (xtr, ytr), (xte, yte) = ds.load_fashion_mnist(str(tmp_path), download_missing=False)
    assert xtr.shape == (6, 28, 28, 1) and xte.shape == (3, 28, 28, 1)
    assert ytr.dtype == np.int32 and xtr.max() <= 1.0


def test_missing_dataset_names_directory_and_files(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    d = str(tmp_path / "mnist")
    with pytest.raises(ds.DatasetNotFoundError) as e:
        ds.load_mnist(d)
    msg = str(e.value)
    assert d in msg and "train-images-idx3-ubyte.gz" in msg
    with pytest.raises(ds.DatasetNotFoundError) as e:
        ds.load_cifar10(str(tmp_path / "c"))
    assert str(tmp_path / "c") in str(e.value) and "data_batch_1.bin" in str(e.value)


def test_download_verifies_sha1(tmp_path, monkeypatch):
    import hashlib
    import io
    import urllib.request

    payload = b"fdl test payload"
    good = hashlib.sha1(payload).hexdigest()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    p = ds.download("http://example.invalid/f.bin", str(tmp_path), sha1=good)
    assert open(p, "rb").read() == payload
    with pytest.raises(ds.DatasetNotFoundError, match="checksum"):
        ds.download("http://example.invalid/g.bin", str(tmp_path), sha1="0" * 40)
    assert not os.path.exists(tmp_path / "g.bin")


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(0)
    recs = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 4).astype(np.uint8)
        pix = rng.integers(0, 256, (4, 3, 32, 32)).astype(np.uint8)
        recs[name] = (labels, pix)
        raw = np.concatenate([labels[:, None], pix.reshape(4, -1)], axis=1)
        raw.tofile(tmp_path / name)
    (xtr, ytr), (xte, yte) = ds.load_cifar10(str(tmp_path), download_missing=False)
    assert xtr.shape == (20, 32, 32, 3) and xte.shape == (4, 32, 32, 3)
    lab, pix = recs["test_batch.bin"]
    np.testing.assert_array_equal(yte, lab)
    np.testing.assert_allclose(xte[1, 5, 7], pix[1, :, 5, 7] / 255.0, rtol=1e-6)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ds.DatasetError, match="test_batch.bin.*corrupt"):
        ds.load_cifar10(str(tmp_path), download_missing=False)


def test_image_folder(tmp_path):
    from PIL import Image

    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        os.makedirs(tmp_path / c)
        for i in range(2):
            Image.new("RGB", (6 + i, 5), color).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    x, y, classes = ds.load_image_folder(str(tmp_path), size=(4, 4))
    assert classes == ["cat", "dog"] and x.shape == (4, 4, 4, 3) and y.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(x[0, 0, 0], [1, 0, 0]) and np.testing.assert_allclose(x[3, 1, 1],
                                                                                      [0, 0, 1])
    with pytest.raises(ValueError, match="pass size"):
        ds.load_image_folder(str(tmp_path))
    with pytest.raises(ds.DatasetNotFoundError, match="no class sub-folders"):
        ds.load_image_folder(str(tmp_path / "cat"))
