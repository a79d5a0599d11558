"""Malformed dataset files are DatasetErrors naming the file: IDX sizes, label ranges, short
headers, corrupt gzip; CIFAR-10 labels and sizes; unreadable images; failed lookups leave no
empty folders behind."""

import gzip
import os
import struct

import numpy as np
import pytest

from fdl.data import datasets as ds


def _idx(arr, code=0x08):
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _mnist_dir(tmp_path, images=None, labels=None, image_code=0x08):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        im = images if images is not None else rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        lab = labels if labels is not None else rng.integers(0, 10, len(im)).astype(np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(im, image_code))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(lab))
    return str(tmp_path)


def test_mnist_declared_image_size(tmp_path):
    d = _mnist_dir(tmp_path, images=np.zeros((4, 27, 27), np.uint8))
    with pytest.raises(ds.DatasetError, match=r"train-images-idx3-ubyte.*\(4, 27, 27\).*28, 28"):
        ds.load_mnist(d, download_missing=False)


def test_mnist_label_range_and_counts(tmp_path):
    d = _mnist_dir(tmp_path, labels=np.array([1, 200, 3, 4, 5, 6], np.uint8))
    with pytest.raises(ds.DatasetError, match=r"labels-idx1-ubyte.*label 200 at index 1"):
        ds.load_mnist(d, download_missing=False)
    d = _mnist_dir(tmp_path, labels=np.array([1, 2], np.uint8))
    with pytest.raises(ds.DatasetError, match="6 images.*2 labels"):
        ds.load_mnist(d, download_missing=False)


def test_mnist_declared_pixel_type(tmp_path):
    d = _mnist_dir(tmp_path, images=np.zeros((6, 28, 28), np.int32), image_code=0x0C)
    with pytest.raises(ds.DatasetError, match="int32.*declares uint8 images"):
        ds.load_mnist(d, download_missing=False)


def test_idx_short_header_and_corrupt_gzip(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # 3 dims declared, 2 bytes of them present
    with pytest.raises(ds.DatasetError, match=f"{p}.*truncated.*3 dimensions"):
        ds.read_idx(str(p))
    good = gzip.compress(_idx(np.zeros((5, 5), np.uint8)))
    p = tmp_path / "bad.gz"
    p.write_bytes(good[:12] + bytes(b ^ 0x5A for b in good[12:]))
    with pytest.raises(ds.DatasetError, match=f"{p}.*corrupt or truncated gzip"):
        ds.read_idx(str(p))
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ds.DatasetError, match=f"{p}.*gzip"):
        ds.read_idx(str(p))
    p.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ds.DatasetError, match=str(p)):
        ds.read_idx(str(p))
    with pytest.raises(ds.DatasetNotFoundError, match="nope"):
        ds.read_idx(str(tmp_path / "nope"))


def test_cifar_label_out_of_range_names_the_record(tmp_path):
    rec = np.zeros((2, 3073), np.uint8)
    rec[1, 0] = 10
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec.tofile(tmp_path / name)
    with pytest.raises(ds.DatasetError, match=r"data_batch_1.bin.*label 10 in record 1"):
        ds.load_cifar10(str(tmp_path), download_missing=False)


def test_unreadable_images_name_the_file(tmp_path):
    from PIL import Image

    os.makedirs(tmp_path / "a")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "0.png")
    raw = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "1.png").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ds.DatasetError, match="1.png"):
        ds.load_image_folder(str(tmp_path))
    (tmp_path / "a" / "1.png").write_bytes(b"not an image at all")
    with pytest.raises(ds.DatasetError, match="cannot read image .*1.png"):
        ds.load_image_folder(str(tmp_path))
    with pytest.raises(ds.DatasetError, match="is a file"):
        ds.load_image_folder(str(tmp_path / "a" / "0.png"))
    with pytest.raises(ValueError, match="size must be"):
        ds.load_image_folder(str(tmp_path), size=-3)


def test_failed_lookup_leaves_no_empty_folders(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    d = tmp_path / "x" / "y" / "mnist"
    with pytest.raises(ds.DatasetNotFoundError, match=str(d)):
        ds.load_mnist(str(d))
    assert os.listdir(tmp_path) == []
