"""Image datasets: scikit-learn's digits (offline), MNIST / Fashion-MNIST IDX files, CIFAR-10
binary batches, image folders, and a checksum-verifying download helper.

Every loader returns NumPy arrays: images ``(N, H, W, C)`` (NHWC) ``float32`` scaled to
``[0, 1]`` and labels ``(N,)`` ``int32``.

**CIFAR-10 and pickle.** The "python version" of CIFAR-10 is a set of pickles; loading a pickle
can execute arbitrary code, so fdl never reads it. fdl reads the *binary version*
(``cifar-10-batches-bin``, from ``cifar-10-binary.tar.gz``): fixed 3073-byte records, one label
byte then 3072 bytes of 32x32 pixels in CHW order.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "DATASETS",
    "load_digits",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_image_folder",
    "download",
    "default_data_dir",
    "train_test_split",
]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


class DatasetError(ValueError):
    """A dataset file that is corrupt, truncated, or not what the dataset declares (image
    size, label range, counts); the message names the file and what is wrong."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file is missing; the message names the directory searched and the files."""


def default_data_dir() -> str:
    """``fdl.config.get("data_dir")``: ``$FDL_DATA`` or ``~/.cache/fdl/data`` by default."""
    from fdl import config

    return config.get("data_dir")


def train_test_split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """A deterministic shuffled split: ``((x_train, y_train), (x_test, y_test))``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


# ----------------------------------------------------------------------------- digits


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """The UCI handwritten digits shipped with scikit-learn (1797 images, 8x8, 10 classes).

    Returns ``((x_train, y_train), (x_test, y_test))`` with images ``(N, 8, 8, 1)`` float32 in
    ``[0, 1]`` and int32 labels; the split is stratification-free, shuffled with ``seed``.
    Works offline (the data ship inside scikit-learn).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset needs scikit-learn, which is not installed; install it with "
            "pip install 'fdl[train]'"
        ) from None
    d = _sk_load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    return train_test_split(x, y, test_fraction, seed)


# ----------------------------------------------------------------------------- download


def _file_hash(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    directory: str,
    filename: str | None = None,
    *,
    sha1: str | None = None,
    md5: str | None = None,
    expected: Sequence[str] | None = None,
    timeout: float = 30.0,
) -> str:
    """Return ``directory/filename``, downloading it from ``url`` first if it is absent.

    A present file is verified against ``sha1`` (or ``md5`` for datasets that publish only
    that); a mismatching file is re-downloaded. Without network, raise
    :class:`DatasetNotFoundError` naming the directory searched and the expected files (plus
    ``expected``, the alternatives a user could place there by hand).
    """
    filename = filename or url.rsplit("/", 1)[-1]
    path = os.path.join(directory, filename)

    def ok(p: str) -> bool:
        if sha1 is not None:
            return _file_hash(p, "sha1") == sha1.lower()
        if md5 is not None:
            return _file_hash(p, "md5") == md5.lower()
        return True

    if os.path.exists(path) and ok(path):
        return path
    names = [filename, *(expected or [])]
    created = _missing_parents(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dl-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                shutil.copyfileobj(r, out)
            if not ok(tmp):
                raise DatasetNotFoundError(
                    f"downloaded {url} but its checksum does not match "
                    f"({'sha1 ' + sha1 if sha1 else 'md5 ' + str(md5)}); not saved to {path}"
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        _remove_empty(created)
        if isinstance(e, DatasetNotFoundError):
            raise
        raise DatasetNotFoundError(
            f"could not find or download the dataset: looked in directory '{directory}' for "
            f"{', '.join(repr(n) for n in names)}; download of {url} failed ({e}). Place the "
            f"file(s) there by hand or set FDL_DATA / --data-dir to where they are."
        ) from None
    return path


def _missing_parents(directory: str) -> list[str]:
    """The directories ``os.makedirs(directory)`` would create, deepest first."""
    out, d = [], os.path.abspath(directory)
    while d and not os.path.exists(d):
        out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def _remove_empty(directories: list[str]) -> None:
    """Remove the directories a failed lookup created (deepest first), if still empty."""
    for d in directories:
        with contextlib.suppress(OSError):
            os.rmdir(d)


# ----------------------------------------------------------------------------- IDX (MNIST)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed (``.gz``) or raw."""
    opener = gzip.open if path.endswith(".gz") else open
    if not os.path.exists(path):
        raise DatasetNotFoundError(f"IDX file '{path}' does not exist")
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        what = "a corrupt or truncated gzip file" if path.endswith(".gz") else "unreadable"
        raise DatasetError(f"cannot read IDX file '{path}': {what} ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(
            f"'{path}' is not an IDX file (expected magic bytes 00 00 <type> <ndim>)"
        )
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(
            f"IDX file '{path}' is truncated: its header declares {ndim} dimensions "
            f"({4 + 4 * ndim} header bytes), the file has {len(raw)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DatasetError(
            f"IDX file '{path}' is truncated or corrupt: header says shape {dims} "
            f"({count * dtype.itemsize} bytes), found {len(body)} bytes"
        )
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_SOURCES = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


def _find_idx(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    return None


def load_mnist(directory: str | None = None, *, kind: str = "mnist", download_missing: bool = True):
    """MNIST (``kind="mnist"``) or Fashion-MNIST (``kind="fashion_mnist"``) from IDX files.

    Looks in ``directory`` (default ``<data dir>/<kind>``) for ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each
    raw or ``.gz``), downloading the ``.gz`` files (md5-verified, the published checksums) if
    missing. Returns ``((x_train, y_train), (x_test, y_test))``, images ``(N, 28, 28, 1)``.
    """
    if kind not in _MNIST_SOURCES:
        raise ValueError(f"kind must be one of {sorted(_MNIST_SOURCES)}, got {kind!r}")
    directory = directory or os.path.join(default_data_dir(), kind)
    base, md5s = _MNIST_SOURCES[kind]
    out = []
    for split in ("train", "test"):
        arrays, paths = [], []
        for stem in _MNIST_FILES[split]:
            path = _find_idx(directory, stem)
            if path is None:
                if not download_missing:
                    raise DatasetNotFoundError(
                        f"{kind}: looked in directory '{directory}' for '{stem}' or '{stem}.gz' "
                        "and found neither"
                    )
                path = download(base + stem + ".gz", directory, md5=md5s[stem + ".gz"],
                                expected=[stem])
            arrays.append(read_idx(path))
            paths.append(path)
        _check_mnist(kind, split, paths, *arrays)
        images, labels = arrays
        out.append(((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)))
    return tuple(out)


def _check_mnist(kind: str, split: str, paths: list[str], images: np.ndarray,
                 labels: np.ndarray) -> None:
    """MNIST's declared format: uint8 images ``(N, 28, 28)``, uint8 labels ``(N,)`` < 10."""
    ipath, lpath = paths
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{kind} {split} images '{ipath}' are {images.dtype} {images.shape}; {kind} "
            "declares uint8 images of shape (N, 28, 28)"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{kind} {split} labels '{lpath}' are {labels.dtype} "
                           f"{labels.shape}; {kind} declares uint8 labels of shape (N,)")
    if len(images) != len(labels):
        raise DatasetError(
            f"{kind} {split} files disagree: '{ipath}' has {len(images)} images, '{lpath}' "
            f"{len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        i = int(np.argmax(labels > 9))
        raise DatasetError(f"{kind} {split} labels '{lpath}': label {int(labels[i])} at index "
                           f"{i} is out of range; {kind} has 10 classes (0-9)")


def load_fashion_mnist(directory: str | None = None, *, download_missing: bool = True):
    """Fashion-MNIST; see :func:`load_mnist`."""
    return load_mnist(directory, kind="fashion_mnist", download_missing=download_missing)


# ----------------------------------------------------------------------------- CIFAR-10

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
_CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CIFAR_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch.bin"]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _read_cifar_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read CIFAR-10 batch '{path}': {e}") from None
    rec = 1 + 3 * 32 * 32
    if raw.size == 0 or raw.size % rec:
        raise DatasetError(
            f"CIFAR-10 batch '{path}' is corrupt: {raw.size} bytes is not a multiple of the "
            f"{rec}-byte record (1 label byte + 3x32x32 pixels)"
        )
    raw = raw.reshape(-1, rec)
    labels = raw[:, 0].astype(np.int32)
    if labels.max() > 9:
        i = int(np.argmax(labels > 9))
        raise DatasetError(f"CIFAR-10 batch '{path}' is corrupt: label {int(labels[i])} in "
                           f"record {i} (CIFAR-10 has 10 classes, 0-9)")
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.astype(np.float32) / 255.0, labels


def load_cifar10(directory: str | None = None, *, download_missing: bool = True):
    """CIFAR-10 from the binary batches (``data_batch_{1..5}.bin``, ``test_batch.bin``).

    ``directory`` (default ``<data dir>/cifar10``) may hold the ``.bin`` files directly or a
    ``cifar-10-batches-bin`` sub-directory; if neither, ``cifar-10-binary.tar.gz`` is used or
    downloaded (md5-verified) and its six batch files extracted. Returns
    ``((x_train, y_train), (x_test, y_test))``, images ``(N, 32, 32, 3)``.
    """
    directory = directory or os.path.join(default_data_dir(), "cifar10")
    names = _CIFAR_TRAIN + _CIFAR_TEST
    cands = [directory, os.path.join(directory, "cifar-10-batches-bin")]
    found = next((d for d in cands if all(os.path.exists(os.path.join(d, n)) for n in names)),
                 None)
    if found is None:
        if not download_missing and not os.path.exists(
            os.path.join(directory, "cifar-10-binary.tar.gz")
        ):
            raise DatasetNotFoundError(
                f"cifar10: looked in directory '{directory}' (and its cifar-10-batches-bin/) "
                f"for {names} or cifar-10-binary.tar.gz and found none"
            )
        archive = download(_CIFAR_URL, directory, md5=_CIFAR_MD5,
                           expected=["cifar-10-batches-bin/" + n for n in names])
        found = os.path.join(directory, "cifar-10-batches-bin")
        os.makedirs(found, exist_ok=True)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar.getmembers():
                    base = os.path.basename(m.name)
                    if m.isfile() and base in names:  # only the known members, no traversal
                        src = tar.extractfile(m)
                        with open(os.path.join(found, base), "wb") as dst:
                            shutil.copyfileobj(src, dst)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"cannot extract CIFAR-10 archive '{archive}': {e}") from None
    train = [_read_cifar_bin(os.path.join(found, n)) for n in _CIFAR_TRAIN]
    test = _read_cifar_bin(os.path.join(found, _CIFAR_TEST[0]))
    x_train = np.concatenate([t[0] for t in train])
    y_train = np.concatenate([t[1] for t in train])
    return (x_train, y_train), test


# ----------------------------------------------------------------------------- image folder

_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp")


def load_image_folder(root: str, size: tuple[int, int] | int | None = None, *, mode: str = "RGB"):
    """Gluon's ``ImageFolderDataset``: one sub-folder per class, sorted by name.

    Returns ``(images, labels, class_names)``: images ``(N, H, W, C)`` float32 in ``[0, 1]``
    (all resized to ``size`` = ``(H, W)`` if given; otherwise all images must share a size),
    labels int32 indices into ``class_names``. ``mode`` is a Pillow mode (``"RGB"``, ``"L"``).
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("load_image_folder needs Pillow: pip install 'fdl[train]'") from None
    if os.path.exists(root) and not os.path.isdir(root):
        raise DatasetError(f"image folder '{root}' is a file, not a directory of class folders")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DatasetNotFoundError(
            f"image folder '{root}' has no class sub-folders (expected {root}/<class>/<image>)"
        )
    if isinstance(size, int):
        size = (size, size)
    if size is not None and (len(size) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)):
        raise ValueError(f"load_image_folder: size must be a positive int or (H, W), got "
                         f"{size!r}")
    images, labels = [], []
    for ci, c in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(root, c))):
            if not fname.lower().endswith(_IMG_EXT):
                continue
            path = os.path.join(root, c, fname)
            try:
                with Image.open(path) as im:
                    im = im.convert(mode)
                    if size is not None:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(im, np.float32) / 255.0
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
                raise DatasetError(f"cannot read image '{path}': {e}") from None
            if a.ndim == 2:
                a = a[..., None]
            if images and a.shape != images[0].shape:
                raise DatasetError(
                    f"image '{path}' has shape {a.shape}, others {images[0].shape}; "
                    "pass size=(H, W) to resize them all"
                )
            images.append(a)
            labels.append(ci)
    if not images:
        raise DatasetNotFoundError(f"image folder '{root}' has no images ({', '.join(_IMG_EXT)})")
    return np.stack(images), np.asarray(labels, np.int32), classes
