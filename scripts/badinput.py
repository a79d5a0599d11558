"""A battery of bad inputs for fdl (API and CLI), counting how each one ends.

    PYTHONPATH=. python -m scripts.badinput [--only api|cli|fuzz] [--verbose]

Every case is a malformed input or a misuse a user could make. Outcomes:

* ``clear``: the error a user can act on: a ``ValueError``/``FileNotFoundError`` family
  exception (``CheckpointError``, ``ShapeError``, ``DatasetError``...) or, for the CLI, exit
  status 2 with one ``fdl: error:`` message, naming what the case requires (the file, the
  layer path, the bad value); or, for cases that must succeed, the right result, said so;
* ``unclear``: the right kind of error but without what the case requires (no path...);
* ``raw``: any other exception (``KeyError``, ``TypeError``, ``struct.error``, a traceback
  out of the CLI);
* ``silent``: no error where one was due, or a wrong result.

The fuzz part flips single bytes and truncates a small checkpoint and counts loads that raise
``CheckpointError``, load exactly the saved tree, raise anything else, or load something else.
Only APIs that have existed since the first CLI are used, so the same script measures older
trees (run it with their directory on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import struct
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable

import numpy as np

CLEAR_TYPES: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
CASES: list[tuple[str, str, Callable[[str], tuple[str, str]]]] = []


def case(group: str, name: str):
    def register(fn):
        CASES.append((group, name, fn))
        return fn

    return register


def expect_error(fn: Callable[[], object], *needles: str) -> tuple[str, str]:
    """Run ``fn``; classify what it raised (``needles`` must all be in the message)."""
    try:
        fn()
    except CLEAR_TYPES as e:
        msg = f"{type(e).__name__}: {e}"
        missing = [n for n in needles if n not in str(e)]
        return ("unclear" if missing else "clear"), msg.splitlines()[0][:160]
    except Exception as e:  # noqa: BLE001 - classifying is the point
        return "raw", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return "silent", "no error"


def run_cli(argv: list[str]) -> tuple[int | None, str, str, str]:
    """``(exit status or None if it raised, stdout, stderr, exception text)``."""
    from fdl import cli

    out, err = io.StringIO(), io.StringIO()
    exc = ""
    rc = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # noqa: BLE001
            exc = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return rc, out.getvalue(), err.getvalue(), exc


def expect_cli_error(argv: list[str], *needles: str, one_line: bool = True) -> tuple[str, str]:
    rc, _, err, exc = run_cli(argv)
    if exc:
        return "raw", exc
    if rc == 0:
        return "silent", "exit 0"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    if "Traceback" in err:
        return "raw", msg[:160]
    if not msg.startswith("fdl: error:") and not msg.startswith("usage:") and \
            "error:" not in msg:
        return "unclear", msg[:160]
    if any(n not in err for n in needles) or (one_line and len(lines) > 1 and
                                               not lines[0].startswith("usage:")):
        return "unclear", msg[:160]
    return "clear", msg[:160]


# ----------------------------------------------------------------------------- checkpoints


def _small_tree():
    import jax
    import jax.numpy as jnp

    return {"params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
                       "b": jnp.ones(4, jnp.float32)},
            "step": 3, "key": jax.random.key(1)}


def _saved(tmp: str, name: str = "c.safetensors") -> str:
    from fdl.train import checkpoint as ckpt

    return str(ckpt.save(os.path.join(tmp, name), _small_tree(), metadata={"model": "m"}))


def _header_edit(path: str, old: bytes, new: bytes) -> None:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    head = raw[8 : 8 + n]
    assert old in head, old
    open(path, "wb").write(raw[:8] + head.replace(old, new, 1) + raw[8 + n :])


def _load_same(path: str, template=True) -> tuple[str, str]:
    """Load; an exact equal tree counts as silent (the edit went unnoticed)."""
    import jax

    from fdl.train import checkpoint as ckpt

    tree = _small_tree()

    def go():
        back = ckpt.load(path, tree if template else None)
        leaves = jax.tree.leaves(back)
        return leaves

    return expect_error(go, path)


def _ckpt_case(name: str, mutate: Callable[[str], None], template: bool = True):
    @case("checkpoint", name)
    def run(tmp):
        path = _saved(tmp)
        mutate(path)
        return _load_same(path, template)

    return run


def _write(content: bytes):
    return lambda p: open(p, "wb").write(content)


def _truncate(frac: float):
    def cut(p):
        raw = open(p, "rb").read()
        open(p, "wb").write(raw[: int(len(raw) * frac)])

    return cut


def _flip(where: Callable[[bytes], int]):
    def flip(p):
        raw = bytearray(open(p, "rb").read())
        raw[where(bytes(raw))] ^= 0xFF
        open(p, "wb").write(bytes(raw))

    return flip


_ckpt_case("zero-byte file", _write(b""))
_ckpt_case("3-byte file", _write(b"abc"))
_ckpt_case("text file", _write(b"this is not a checkpoint at all, just text"))
_ckpt_case("truncated in the header", _truncate(0.05))
_ckpt_case("truncated in the data", _truncate(0.97))
_ckpt_case("header length huge", lambda p: open(p, "r+b").write(struct.pack("<Q", 2**40)))
_ckpt_case("header dtype F32 -> I32", lambda p: _header_edit(p, b'"dtype":"F32"',
                                                             b'"dtype":"I32"'))
_ckpt_case("header shape [3,4] -> [4,3]", lambda p: _header_edit(p, b'"shape":[3,4]',
                                                                 b'"shape":[4,3]'))
_ckpt_case("header shape edit, no template",
           lambda p: _header_edit(p, b'"shape":[3,4]', b'"shape":[4,3]'), template=False)
_ckpt_case("header offsets edited", lambda p: _header_edit(p, b'"data_offsets":[0,',
                                                           b'"data_offsets":[4,'))
_ckpt_case("description dtype edited", lambda p: _header_edit(
    p, b'\\"dtype\\": \\"float32\\"', b'\\"dtype\\": \\"float16\\"'))
_ckpt_case("description path renamed", lambda p: _header_edit(p, b"params/w\\",
                                                              b"params/v\\"))
_ckpt_case("last data byte flipped", _flip(lambda raw: len(raw) - 1))
_ckpt_case("header JSON byte flipped", _flip(lambda raw: 9))
_ckpt_case("header length byte flipped", _flip(lambda raw: 0))
_ckpt_case("not JSON header", lambda p: _header_edit(p, b'{"__metadata__"', b'["__metadata__"'))


@case("checkpoint", "user metadata edited (cnn -> mlp)")
def _meta_edit(tmp):
    from fdl.train import checkpoint as ckpt

    path = str(ckpt.save(os.path.join(tmp, "c.safetensors"), {"w": np.ones(2, np.float32)},
                         metadata={"model": "cnn"}))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw.replace(b"cnn", b"mlp"))

    def go():
        if ckpt.load_metadata(path).get("model") == "mlp":
            return "silent"
        return None

    return expect_error(go, path)


@case("checkpoint", "safetensors file not written by fdl")
def _foreign(tmp):
    from safetensors.numpy import save_file

    from fdl.train import checkpoint as ckpt

    path = os.path.join(tmp, "x.safetensors")
    save_file({"w": np.ones(3, np.float32)}, path)
    return expect_error(lambda: ckpt.load(path), path)


@case("checkpoint", "path is a directory")
def _dir(tmp):
    from fdl.train import checkpoint as ckpt

    return expect_error(lambda: ckpt.load(tmp), tmp)


@case("checkpoint", "missing file")
def _missing(tmp):
    from fdl.train import checkpoint as ckpt

    p = os.path.join(tmp, "nope.safetensors")
    return expect_error(lambda: ckpt.load(p), p)


@case("checkpoint", "template shape mismatch")
def _tmpl_shape(tmp):
    import jax.numpy as jnp

    from fdl.train import checkpoint as ckpt

    path = _saved(tmp)
    t = _small_tree()
    t["params"]["w"] = jnp.zeros((4, 3), jnp.float32)
    return expect_error(lambda: ckpt.load(path, t), "params/w")


@case("checkpoint", "template dtype mismatch")
def _tmpl_dtype(tmp):
    import jax.numpy as jnp

    from fdl.train import checkpoint as ckpt

    path = _saved(tmp)
    t = _small_tree()
    t["params"]["b"] = jnp.zeros(4, jnp.int32)
    return expect_error(lambda: ckpt.load(path, t), "params/b")


@case("checkpoint", "npz truncated")
def _npz_trunc(tmp):
    path = _saved(tmp, "c.npz")
    _truncate(0.6)(path)
    return _load_same(path)


@case("checkpoint", "npz byte flipped in the data")
def _npz_flip(tmp):
    path = _saved(tmp, "c.npz")
    raw = bytearray(open(path, "rb").read())
    i = raw.find(np.arange(12, dtype=np.float32).tobytes())
    raw[i + 5] ^= 0x10
    open(path, "wb").write(bytes(raw))
    return _load_same(path)


@case("checkpoint", "manager restore with a zero-byte newest file")
def _mgr_stray(tmp):
    import jax.numpy as jnp

    from fdl.train import checkpoint as ckpt

    m = ckpt.CheckpointManager(tmp, keep=5)
    m.save(1, {"w": jnp.ones(2, jnp.float32)})
    open(m.path_for(2), "wb").close()
    try:
        back = m.restore({"w": jnp.zeros(2, jnp.float32)})
    except Exception as e:  # noqa: BLE001
        return ("raw" if not isinstance(e, CLEAR_TYPES) else "unclear"), \
            f"{type(e).__name__}: refuses instead of using the intact older checkpoint"
    return ("clear", "restored the intact older checkpoint") if float(back["w"][0]) == 1.0 \
        else ("silent", "wrong tree")


@case("checkpoint", "rotation after a longer earlier run in the same folder")
def _rotation(tmp):
    import jax.numpy as jnp

    from fdl.train import checkpoint as ckpt

    old = ckpt.CheckpointManager(tmp, keep=3)
    for s in (69, 138, 207):
        old.save(s, {"w": jnp.zeros(2, jnp.float32)})
    new = ckpt.CheckpointManager(tmp, keep=3)
    path = new.save(23, {"w": jnp.ones(2, jnp.float32)})
    if not os.path.exists(path):
        return "silent", "deleted the checkpoint it had just written"
    return "clear", "kept the new run's checkpoint"


# ----------------------------------------------------------------------------- losses


def _logits(n=4, k=10):
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(0).normal(size=(n, k)), jnp.float32)


def _loss_case(name: str, make: Callable[[], object], jit: bool = False, needle: str = "label"):
    @case("losses", name)
    def run(tmp):
        import jax

        if jit:
            try:
                out = jax.jit(make)()
            except Exception as e:  # noqa: BLE001
                return ("clear" if isinstance(e, CLEAR_TYPES) else "raw"), str(e)[:120]
            v = float(np.asarray(out).reshape(-1)[0])
            return ("clear", "NaN") if np.isnan(v) else ("silent", f"loss {v:.4f}")
        return expect_error(make, needle)

    return run


def _L():
    from fdl.nn import losses

    return losses


_loss_case("softmax CE label 12 of 10", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([1, 2, 12, 3])))
_loss_case("softmax CE label -1", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([1, -1, 2, 3])))
_loss_case("softmax CE label 10 (== K)", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([10, 1, 2, 3])))
_loss_case("softmax CE label out of range, smoothing 0.1", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([1, 2, 30, 3]), label_smoothing=0.1))
_loss_case("softmax CE sequence label 5 of 5", lambda: _L().softmax_cross_entropy(
    np.zeros((2, 3, 5), np.float32), np.array([[0, 1, 2], [3, 5, 4]])))
_loss_case("softmax CE label 12 under jit", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([1, 2, 12, 3])), jit=True)
_loss_case("hinge label 3 of 3", lambda: _L().multiclass_hinge_loss(
    np.zeros((2, 3), np.float32), np.array([0, 3])))
_loss_case("hinge label 3 of 3 under jit", lambda: _L().multiclass_hinge_loss(
    np.zeros((2, 3), np.float32), np.array([0, 3])), jit=True)
_loss_case("binary CE target 2.0", lambda: _L().sigmoid_binary_cross_entropy(
    np.zeros(3, np.float32), np.array([2.0, 1.0, 0.0], np.float32)))
_loss_case("binary CE target -1", lambda: _L().sigmoid_binary_cross_entropy(
    np.zeros(2, np.float32), np.array([0, -1])))
_loss_case("softmax CE (N,1) integer labels, (N,3) logits", lambda: _L().softmax_cross_entropy(
    np.zeros((4, 3), np.float32), np.zeros((4, 1), np.int32)), needle="shape")
_loss_case("softmax CE float labels shaped like indices", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([1.0, 2.0, 3.0, 4.0], np.float32)), needle="integer")
_loss_case("bad reduction", lambda: _L().softmax_cross_entropy(
    _logits(), np.array([1, 2, 3, 4]), reduction="avg"), needle="reduction")


@case("losses", "padding label -100 at weight 0 (must work)")
def _pad_ok(tmp):
    L = _L()
    try:
        v = float(L.softmax_cross_entropy(_logits(), np.array([1, 2, -100, 3]),
                                          weights=np.array([1.0, 1.0, 0.0, 1.0])))
    except Exception as e:  # noqa: BLE001
        return "raw", f"refused valid padding: {type(e).__name__}"
    want = float(L.softmax_cross_entropy(_logits()[np.array([0, 1, 3])], np.array([1, 2, 3])))
    return ("clear", "ok") if abs(v - want) < 1e-5 else ("silent", f"{v} != {want}")


# ----------------------------------------------------------------------------- datasets


def _idx(arr, code=0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _mnist(tmp, images=None, labels=None, image_code=0x08, test_images=None):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        im = images if images is not None else rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        if prefix == "t10k" and test_images is not None:
            im = test_images
        lab = labels if labels is not None and prefix == "train" else \
            rng.integers(0, 10, len(im)).astype(np.uint8)
        open(os.path.join(tmp, f"{prefix}-images-idx3-ubyte"), "wb").write(_idx(im, image_code))
        open(os.path.join(tmp, f"{prefix}-labels-idx1-ubyte"), "wb").write(_idx(lab))
    return tmp


def _D():
    from fdl.data import datasets

    return datasets


@case("datasets", "MNIST images 27x27")
def _m27(tmp):
    d = _mnist(tmp, images=np.zeros((6, 27, 27), np.uint8))
    return expect_error(lambda: _D().load_mnist(d, download_missing=False), "images-idx3")


@case("datasets", "MNIST label 200")
def _m200(tmp):
    d = _mnist(tmp, labels=np.array([1, 200, 3, 4, 5, 6], np.uint8))
    return expect_error(lambda: _D().load_mnist(d, download_missing=False), "labels-idx1")


@case("datasets", "MNIST int32 pixels")
def _mint(tmp):
    d = _mnist(tmp, images=np.zeros((6, 28, 28), np.int32), image_code=0x0C)
    return expect_error(lambda: _D().load_mnist(d, download_missing=False), "images-idx3")


@case("datasets", "MNIST 6 images, 2 labels")
def _mcount(tmp):
    d = _mnist(tmp, labels=np.array([1, 2], np.uint8))
    return expect_error(lambda: _D().load_mnist(d, download_missing=False), "labels-idx1")


@case("datasets", "MNIST test images 3-d but 1-d labels file as images")
def _mrank(tmp):
    d = _mnist(tmp, test_images=np.zeros(3, np.uint8))
    return expect_error(lambda: _D().load_mnist(d, download_missing=False), "t10k-images")


@case("datasets", "MNIST missing files, no download")
def _mmissing(tmp):
    return expect_error(lambda: _D().load_mnist(tmp, download_missing=False), tmp)


def _idx_case(name: str, content: Callable[[], bytes], fname: str = "f-idx1-ubyte"):
    @case("datasets", name)
    def run(tmp):
        p = os.path.join(tmp, fname)
        open(p, "wb").write(content())
        return expect_error(lambda: _D().read_idx(p), p)

    return run


_idx_case("IDX short header", lambda: bytes([0, 0, 8, 3, 0, 0]))
_idx_case("IDX empty file", lambda: b"")
_idx_case("IDX wrong magic", lambda: b"hello world")
_idx_case("IDX truncated body", lambda: _idx(np.zeros((4, 4), np.uint8))[:-3])
_idx_case("IDX unknown type code", lambda: bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
_idx_case("IDX corrupt gzip", lambda: (lambda g: g[:12] + bytes(b ^ 0x5A for b in g[12:]))(
    gzip.compress(_idx(np.zeros((5, 5), np.uint8)))), fname="f.gz")
_idx_case("IDX truncated gzip", lambda: gzip.compress(_idx(np.zeros((50, 50), np.uint8)))[:40],
          fname="f.gz")
_idx_case("IDX .gz that is not gzip", lambda: b"plain bytes", fname="f.gz")


@case("datasets", "IDX path is a directory")
def _idxdir(tmp):
    return expect_error(lambda: _D().read_idx(tmp), tmp)


def _cifar(tmp, label=0, size=3073 * 2):
    rec = np.zeros(size, np.uint8)
    rec[3073:3074] = label
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec.tofile(os.path.join(tmp, name))
    return tmp


@case("datasets", "CIFAR label 10")
def _c10(tmp):
    d = _cifar(tmp, label=10)
    return expect_error(lambda: _D().load_cifar10(d, download_missing=False), "data_batch_1")


@case("datasets", "CIFAR size not a multiple of 3073")
def _csize(tmp):
    d = _cifar(tmp, size=3000)
    return expect_error(lambda: _D().load_cifar10(d, download_missing=False), "data_batch_1")


@case("datasets", "CIFAR a batch file missing, no download")
def _cmissing(tmp):
    d = _cifar(tmp)
    os.remove(os.path.join(d, "data_batch_3.bin"))
    return expect_error(lambda: _D().load_cifar10(d, download_missing=False), tmp)


@case("datasets", "CIFAR batch is a directory")
def _cdir(tmp):
    d = _cifar(tmp)
    os.remove(os.path.join(d, "test_batch.bin"))
    os.mkdir(os.path.join(d, "test_batch.bin"))
    return expect_error(lambda: _D().load_cifar10(d, download_missing=False), "test_batch")


def _folder(tmp, bad: bytes | None = None, sizes=(4, 4)):
    from PIL import Image

    os.makedirs(os.path.join(tmp, "a"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "b"), exist_ok=True)
    Image.new("RGB", (sizes[0], sizes[0])).save(os.path.join(tmp, "a", "0.png"))
    Image.new("RGB", (sizes[1], sizes[1])).save(os.path.join(tmp, "b", "0.png"))
    if bad is not None:
        open(os.path.join(tmp, "b", "1.png"), "wb").write(bad)
    return tmp


@case("datasets", "image folder: text file named .png")
def _ftext(tmp):
    d = _folder(tmp, b"not an image")
    return expect_error(lambda: _D().load_image_folder(d), "1.png")


@case("datasets", "image folder: truncated png")
def _ftrunc(tmp):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (3, 4, 5)).save(buf, "PNG")
    d = _folder(tmp, buf.getvalue()[:60])
    return expect_error(lambda: _D().load_image_folder(d), "1.png")


@case("datasets", "image folder: mixed sizes without size=")
def _fmixed(tmp):
    d = _folder(tmp, sizes=(4, 5))
    return expect_error(lambda: _D().load_image_folder(d), "0.png")


@case("datasets", "image folder: path is a file")
def _ffile(tmp):
    p = os.path.join(tmp, "f.png")
    open(p, "wb").write(b"x")
    return expect_error(lambda: _D().load_image_folder(p), p)


@case("datasets", "image folder: missing")
def _fmissing(tmp):
    p = os.path.join(tmp, "nope")
    return expect_error(lambda: _D().load_image_folder(p), p)


@case("datasets", "image folder: size=-3")
def _fsize(tmp):
    d = _folder(tmp)
    return expect_error(lambda: _D().load_image_folder(d, size=-3), "size")


@case("datasets", "failed download leaves no empty folders")
def _dl_clean(tmp):
    import urllib.error
    import urllib.request

    real = urllib.request.urlopen

    def offline(*a, **k):
        raise urllib.error.URLError("offline")

    urllib.request.urlopen = offline
    try:
        target = os.path.join(tmp, "x", "y", "mnist")
        status, msg = expect_error(lambda: _D().load_mnist(target), target)
    finally:
        urllib.request.urlopen = real
    if status == "clear" and os.listdir(tmp):
        return "silent", f"left empty folders behind: {os.listdir(tmp)}"
    return status, msg


# ----------------------------------------------------------------------------- apply


def _cnn():
    from fdl import nn

    return nn.serial(("conv1", nn.conv2d(6, 3, padding=1)), ("bn1", nn.batch_norm()),
                     ("act", nn.relu()), ("flat", nn.flatten()), ("fc", nn.dense(10)))


def _apply_case(name: str, edit: Callable[[dict], None], *needles: str):
    @case("apply", name)
    def run(tmp):
        import jax
        import jax.numpy as jnp

        net = _cnn()
        _, p, s = net.init(jax.random.key(0), (2, 8, 8, 1))
        edit(p)

        def go():
            y, _ = net.apply(p, s, jnp.zeros((2, 8, 8, 1)))
            if y.shape != (2, 10):
                return "silent"
            return y

        return expect_error(go, *needles)

    return run


def _jz(*shape):
    import jax.numpy as jnp

    return jnp.zeros(shape, jnp.float32)


_apply_case("renamed layer fc -> fc2", lambda p: p.__setitem__("fc2", p.pop("fc")), "fc")
_apply_case("conv1 out-channels 8 instead of 6",
            lambda p: p["conv1"].__setitem__("w", _jz(3, 3, 1, 8)), "conv1", "(3, 3, 1, 8)")
_apply_case("consistent 12-class head", lambda p: p.__setitem__(
    "fc", {"w": _jz(384, 12), "b": _jz(12)}), "fc", "(384, 12)")
_apply_case("missing bias", lambda p: p["fc"].pop("b"), "fc", "b")
_apply_case("extra param", lambda p: p["fc"].__setitem__("extra", _jz(3)), "extra")
_apply_case("transposed dense kernel", lambda p: p["fc"].__setitem__("w", _jz(10, 384)),
            "fc", "(10, 384)")
_apply_case("bn scale wrong length", lambda p: p["bn1"].__setitem__("scale", _jz(7)),
            "bn1", "(7,)")
_apply_case("layer params an array, not a dict",
            lambda p: p.__setitem__("fc", _jz(384, 10)), "fc")
_apply_case("empty params", lambda p: p.clear(), "conv1")


@case("apply", "mlp params into the cnn")
def _other_model(tmp):
    import jax
    import jax.numpy as jnp

    from fdl import nn

    mlp = nn.serial(("flat", nn.flatten()), ("fc1", nn.dense(32)), ("fc", nn.dense(10)))
    _, p, _ = mlp.init(jax.random.key(0), (2, 8, 8, 1))
    net = _cnn()
    _, _, s = net.init(jax.random.key(0), (2, 8, 8, 1))
    return expect_error(lambda: net.apply(p, s, jnp.zeros((2, 8, 8, 1))), "conv1")


@case("apply", "GRU params in an LSTM")
def _gru_lstm(tmp):
    import jax
    import jax.numpy as jnp

    from fdl import nn

    lstm = nn.serial(("rnn", nn.lstm(8)), ("head", nn.dense(3)))
    gru = nn.serial(("rnn", nn.gru(8)), ("head", nn.dense(3)))
    _, p, _ = gru.init(jax.random.key(0), (2, 5, 4))
    _, _, s = lstm.init(jax.random.key(0), (2, 5, 4))
    return expect_error(lambda: lstm.apply(p, s, jnp.zeros((2, 5, 4))), "rnn")


@case("apply", "parallel branch with wrong width")
def _par(tmp):
    import jax
    import jax.numpy as jnp

    from fdl import nn

    par = nn.parallel(("a", nn.dense(3)), ("b", nn.dense(4)))
    _, p, s = par.init(jax.random.key(0), (2, 5))
    p["b"]["w"] = jnp.zeros((5, 3))
    p["b"]["b"] = jnp.zeros(3)

    def go():
        y, _ = par.apply(p, s, jnp.zeros((2, 5)))
        return "silent" if y.shape != (2, 7) else y

    return expect_error(go, "b")


@case("apply", "residual body with wrong width")
def _res(tmp):
    import jax
    import jax.numpy as jnp

    from fdl import nn

    res = nn.residual(nn.serial(("fc", nn.dense(5)), nn.relu()))
    _, p, s = res.init(jax.random.key(0), (2, 5))
    p["body"]["fc"]["w"] = jnp.zeros((5, 6))
    return expect_error(lambda: res.apply(p, s, jnp.zeros((2, 5))), "body/fc")


@case("apply", "input of the wrong rank")
def _rank(tmp):
    import jax
    import jax.numpy as jnp

    net = _cnn()
    _, p, s = net.init(jax.random.key(0), (2, 8, 8, 1))
    return expect_error(lambda: net.apply(p, s, jnp.zeros((2, 8, 8))), "conv1")


@case("apply", "input with the wrong channels")
def _chan(tmp):
    import jax
    import jax.numpy as jnp

    net = _cnn()
    _, p, s = net.init(jax.random.key(0), (2, 8, 8, 1))
    return expect_error(lambda: net.apply(p, s, jnp.zeros((2, 8, 8, 3))), "conv1")


# ----------------------------------------------------------------------------- state dicts


def _sd_case(name: str, make: Callable[[str], str], *needles: str):
    @case("state dict", name)
    def run(tmp):
        from fdl.interop import load_state_dict

        path = make(tmp)
        return expect_error(lambda: load_state_dict(path), *(n.format(path=path)
                                                             for n in needles))

    return run


def _torch_save(obj_fn, fname):
    def make(tmp):
        import torch

        p = os.path.join(tmp, fname)
        torch.save(obj_fn(torch), p)
        return p

    return make


def _raw(content: bytes, fname: str):
    def make(tmp):
        p = os.path.join(tmp, fname)
        open(p, "wb").write(content)
        return p

    return make


_sd_case(".pt holding a list of tensors", _torch_save(lambda t: [t.ones(2)], "l.pt"), "l.pt")
_sd_case(".pt holding a pickled module", _torch_save(lambda t: t.nn.Linear(2, 3), "m.pt"),
         "m.pt")
_sd_case(".pt holding one tensor", _torch_save(lambda t: t.ones(3), "t.pt"), "t.pt")
_sd_case(".pt with a nested config dict", _torch_save(
    lambda t: {"fc.weight": t.ones(2), "config": {"lr": 0.1}}, "c.pt"), "c.pt", "config")
_sd_case(".pt with a string value", _torch_save(
    lambda t: {"fc.weight": t.ones(2), "arch": "resnet"}, "s.pt"), "s.pt", "arch")
_sd_case(".pt of random bytes", _raw(b"\x80\x02 not a pickle at all", "r.pt"), "r.pt")
_sd_case(".pt truncated zip", _raw(b"PK\x03\x04\x00\x00", "z.pt"), "z.pt")
_sd_case(".npz corrupt", _raw(b"PK\x03\x04 garbage", "x.npz"), "x.npz")
_sd_case(".safetensors corrupt", _raw(b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "x.safetensors"),
         "x.safetensors")
_sd_case("missing .pt", lambda tmp: os.path.join(tmp, "nope.pt"), "nope.pt")
_sd_case("unsupported suffix", _raw(b"x", "w.h5"), "w.h5")


@case("state dict", "mapping with None value")
def _sd_none(tmp):
    from fdl.interop import load_state_dict

    return expect_error(lambda: load_state_dict({"w": np.ones(2), "b": None}), "'b'")


# ----------------------------------------------------------------------------- CLI

_RUN: dict[str, str] = {}


def _trained(tmp_root: str) -> str:
    """Output root of one short shared training run (softmax on digits, 1 epoch)."""
    if "out" not in _RUN:
        out = os.path.join(tmp_root, "shared-runs")
        rc, stdout, err, exc = run_cli(["train", "softmax", "--epochs", "1", "--batch-size",
                                        "128", "--output", out, "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"the shared CLI run failed: {exc or err}")
        _RUN["out"] = out
    return _RUN["out"]


def _ckpts(root: str) -> list[str]:
    found = []
    for d, _, files in os.walk(root):
        found += [os.path.join(d, f) for f in files if f.startswith("ckpt_")]
    return sorted(found, key=os.path.basename)


def _cli_case(name: str, argv: list[str], *needles: str, one_line: bool = True):
    @case("cli", name)
    def run(tmp):
        file = os.path.join(tmp, "afile")
        open(file, "w").write("x")
        fill = lambda s: s.replace("{tmp}", tmp).replace("{file}", file)
        args = [fill(a) for a in argv]
        if args[0] == "train" and "--output" not in args:
            args += ["--output", os.path.join(tmp, "out")]
        return expect_cli_error(args, *map(fill, needles), one_line=one_line)

    return run


_QUICK = ["--epochs", "1", "--batch-size", "128", "--no-progress"]
_cli_case("--epochs 0", ["train", "--epochs", "0"], "--epochs")
_cli_case("--lr -1", ["train", "--lr", "-1"], "--lr")
_cli_case("--lr nan", ["train", "--lr", "nan"], "--lr")
_cli_case("--batch-size 0", ["train", "--batch-size", "0"], "--batch-size")
_cli_case("--batch-size 100000", ["train", "softmax", "--batch-size", "100000"], "--batch-size")
_cli_case("--weight-decay -1", ["train", "softmax", "--weight-decay", "-1", *_QUICK],
          "--weight-decay")
_cli_case("--devices -3", ["train", "softmax", "--devices", "-3", *_QUICK], "--devices")
_cli_case("--devices 4096", ["train", "--devices", "4096"], "--devices")
_cli_case("--seed -1", ["train", "softmax", "--seed", "-1", *_QUICK], "--seed")
_cli_case("--image-size 0", ["train", "softmax", "--image-size", "0", *_QUICK], "--image-size")
_cli_case("--epochs abc", ["train", "--epochs", "abc"], "--epochs")
_cli_case("unknown model", ["train", "nosuch"], "nosuch")
_cli_case("unknown optimizer", ["train", "--optimizer", "adamax"], "adamax")
_cli_case("unknown dataset", ["train", "--data", "nope"], "nope")
_cli_case("--data is a file", ["train", "--data", "{file}"], "{file}")
_cli_case("lenet on 8x8 digits", ["train", "lenet"], "12x12")
_cli_case("--output under a regular file", ["train", "softmax", "--epochs", "1", "--output",
                                            "{file}/runs", "--no-progress"], "{file}")
_cli_case("--checkpoint-dir is a file", ["train", "softmax", "--epochs", "1",
                                         "--checkpoint-dir", "{file}", "--no-progress"],
          "{file}")
_cli_case("--output unwritable (under /proc)", ["train", "softmax", "--epochs", "1",
                                                "--output", "/proc/fdl-runs", "--no-progress"],
          "/proc")
_cli_case("eval: missing checkpoint", ["eval", "/nonexistent/ckpt.safetensors"], "/nonexistent")
_cli_case("eval: empty folder", ["eval", "{tmp}"], "{tmp}")
_cli_case("eval: a text file", ["eval", "{file}"], "{file}")
_cli_case("predict: missing run", ["predict", "/nonexistent"], "/nonexistent")


@case("cli", "MNIST --data-dir as in the README looks in that folder")
def _datadir(tmp):
    d = os.path.join(tmp, "mnist-files")
    os.makedirs(d)
    _mnist(d)
    from fdl import cli

    try:
        (xtr, _), _, _ = cli.load_dataset("mnist", d, None)
    except Exception as e:  # noqa: BLE001
        return "silent" if "mnist-files/mnist" in str(e) else "raw", \
            f"looked elsewhere: {str(e).splitlines()[0][:120]}"
    return "clear", "found the files in --data-dir itself"


@case("cli", "failed MNIST lookup leaves no empty folders")
def _lookup_clean(tmp):
    import urllib.error
    import urllib.request

    real = urllib.request.urlopen

    def offline(*a, **k):
        raise urllib.error.URLError("offline")

    urllib.request.urlopen = offline
    try:
        target = os.path.join(tmp, "data")
        status, msg = expect_cli_error(["train", "--data", "mnist", "--data-dir", target,
                                        "--output", os.path.join(tmp, "out")], "data")
    finally:
        urllib.request.urlopen = real
    left = [os.path.relpath(os.path.join(d, n), tmp) for d, ds, _ in os.walk(tmp) for n in ds]
    if status == "clear" and left:
        return "silent", f"left folders behind: {left}"
    return status, msg


@case("cli", "predict: a text file as image")
def _pred_text(tmp):
    out = _trained(os.path.dirname(tmp))
    p = os.path.join(tmp, "notes.png")
    open(p, "w").write("not an image")
    return expect_cli_error(["predict", _ckpts(out)[-1], p], "notes.png")


@case("cli", "predict: --count -1")
def _pred_count(tmp):
    out = _trained(os.path.dirname(tmp))
    rc, stdout, err, exc = run_cli(["predict", _ckpts(out)[-1], "--count", "-1"])
    if exc:
        return "raw", exc
    if rc == 0:
        return "silent", f"exit 0 with {len(stdout.splitlines())} lines"
    return ("clear" if "--count" in err else "unclear"), err.strip()[:120]


@case("cli", "eval: zero-byte newest checkpoint falls back with a warning")
def _eval_stray(tmp):
    import shutil

    out = _trained(os.path.dirname(tmp))
    run = os.path.join(tmp, "run")
    shutil.copytree(os.path.dirname(_ckpts(out)[-1]), run)
    open(os.path.join(run, "ckpt_99999999.safetensors"), "wb").close()
    rc, stdout, err, exc = run_cli(["eval", run])
    if exc:
        return "raw", exc
    if rc != 0:
        return "unclear", f"refused: {err.strip()[:120]}"
    return ("clear", "fell back, warned") if "ckpt_99999999" in err else \
        ("silent", "no warning")


@case("cli", "second train run keeps the first run's files")
def _clobber(tmp):
    out = os.path.join(tmp, "runs")
    base = ["train", "softmax", "--epochs", "2", "--batch-size", "128", "--output", out,
            "--no-progress"]
    if run_cli(base)[0] != 0:
        return "raw", "first run failed"
    before = {p: open(p, "rb").read() for p in _ckpts(out)}
    rc, stdout, err, exc = run_cli([*base[:2], "--epochs", "1", *base[4:], "--lr", "0.1"])
    if exc or rc != 0:
        return "raw", exc or err[:120]
    lost = [p for p, b in before.items() if not os.path.exists(p) or open(p, "rb").read() != b]
    printed = stdout.split("checkpoint: ")[-1].split("\n")[0].strip()
    if lost:
        return "silent", f"{len(lost)} checkpoint(s) of the first run lost or overwritten"
    if printed and not os.path.exists(printed):
        return "silent", "printed a checkpoint path that does not exist"
    return "clear", "both runs intact"


@case("cli", "--resume on a finished run")
def _resume_done(tmp):
    out = os.path.join(tmp, "runs")
    base = ["train", "softmax", "--epochs", "1", "--batch-size", "128", "--output", out,
            "--no-progress"]
    if run_cli(base)[0] != 0:
        return "raw", "first run failed"
    rc, stdout, err, exc = run_cli([*base, "--resume"])
    if exc:
        return "raw", exc
    return ("clear", "says nothing was trained") if "nothing" in stdout.lower() else \
        ("silent", stdout.strip().splitlines()[-1][:120] if stdout.strip() else "")


# ----------------------------------------------------------------------------- fuzz


def fuzz(tmp: str, flips: int = 250, cuts: int = 50, seed: int = 0) -> Counter:
    import jax

    from fdl.train import checkpoint as ckpt

    tree = _small_tree()
    counts: Counter = Counter()
    for suffix in (".safetensors", ".npz"):
        path = str(ckpt.save(os.path.join(tmp, f"c{suffix}"), tree))
        raw = open(path, "rb").read()
        want = [np.asarray(jax.random.key_data(x) if hasattr(x, "dtype") and
                           jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
                for x in jax.tree.leaves(tree)]
        rng = np.random.default_rng(seed)
        trials = [("flip", int(i), int(rng.integers(1, 256)))
                  for i in rng.integers(0, len(raw), flips)]
        trials += [("cut", int(i), 0) for i in rng.integers(0, len(raw), cuts)]
        for kind, i, x in trials:
            b = bytearray(raw)
            if kind == "flip":
                b[i] ^= x
            else:
                b = b[:i]
            p = os.path.join(tmp, f"f{suffix}")
            open(p, "wb").write(bytes(b))
            try:
                back = ckpt.load(p, tree)
            except ckpt.CheckpointError:
                counts["CheckpointError"] += 1
                continue
            except Exception:  # noqa: BLE001
                counts["raw"] += 1
                continue
            got = [np.asarray(jax.random.key_data(x) if hasattr(x, "dtype") and
                              jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
                   for x in jax.tree.leaves(back)]
            same = all(a.dtype == c.dtype and a.shape == c.shape and a.tobytes() == c.tobytes()
                       for a, c in zip(want, got, strict=True))
            counts["loaded exactly" if same else "silent"] += 1
    return counts


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("api", "cli", "fuzz"), default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    results = []
    with tempfile.TemporaryDirectory() as root:
        for i, (group, name, fn) in enumerate(CASES):
            is_cli = group == "cli"
            if args.only == "fuzz" or (args.only == "api" and is_cli) or \
                    (args.only == "cli" and not is_cli):
                continue
            tmp = os.path.join(root, f"case{i}")
            os.makedirs(tmp)
            try:
                status, detail = fn(tmp)
            except Exception as e:  # noqa: BLE001 - a broken case is reported, not hidden
                status, detail = "raw", f"(case crashed) {type(e).__name__}: {e}"
                if args.verbose:
                    traceback.print_exc()
            results.append({"group": group, "case": name, "outcome": status,
                            "detail": detail})
            if args.verbose or status != "clear":
                print(f"{status:8} {group:11} {name}: {detail}", flush=True)
        fuzz_counts = None
        if args.only in (None, "fuzz"):
            fdir = os.path.join(root, "fuzz")
            os.makedirs(fdir)
            fuzz_counts = fuzz(fdir)
    by_group: dict[str, Counter] = {}
    for r in results:
        by_group.setdefault(r["group"], Counter())[r["outcome"]] += 1
    print("\ngroup        cases  clear  unclear  raw  silent")
    total: Counter = Counter()
    for g, c in by_group.items():
        total.update(c)
        print(f"{g:12} {sum(c.values()):5}  {c['clear']:5}  {c['unclear']:7}  {c['raw']:3}  "
              f"{c['silent']:6}")
    print(f"{'total':12} {sum(total.values()):5}  {total['clear']:5}  {total['unclear']:7}  "
          f"{total['raw']:3}  {total['silent']:6}")
    if fuzz_counts is not None:
        print(f"\ncheckpoint fuzz ({sum(fuzz_counts.values())} loads of single-byte flips and "
              f"truncations): {dict(fuzz_counts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": results, "fuzz": dict(fuzz_counts or {})}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
