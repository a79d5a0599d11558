"""Checkpoint integrity: the checksum covers header and data, header edits are caught, every
malformed file is a CheckpointError naming it (a bounded fuzz), the newest intact checkpoint
is found in a directory, and rotation never deletes the writing run's checkpoints."""

import hashlib
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.train import checkpoint as ckpt


def _small_tree():
    return {
        "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
                   "b": jnp.array([1.5, -2.0, 0.25, 8.0], jnp.float32)},
        "count": jnp.int32(7),
        "key": jax.random.key(3),
        "step": 5,
    }


def _same(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        xa, ya = np.asarray(x), np.asarray(y)
        if xa.dtype != ya.dtype or xa.shape != ya.shape or xa.tobytes() != ya.tobytes():
            return False
    return True


def _header(raw: bytes) -> tuple[int, str]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n].decode()


def _edit_header(path, old: str, new: str):
    raw = open(path, "rb").read()
    n, text = _header(raw)
    assert old in text and len(old) == len(new)
    open(path, "wb").write(raw[:8] + text.replace(old, new, 1).encode() + raw[8 + n :])


def test_header_dtype_edit_is_caught_even_with_a_template(tmp_path):
    tree = {"w": jnp.ones((3, 4), jnp.float32)}
    path = ckpt.save(tmp_path / "c.safetensors", tree)
    _edit_header(path, '"dtype":"F32"', '"dtype":"I32"')
    with pytest.raises(ckpt.CheckpointError, match="c.safetensors.*corrupt"):
        ckpt.load(path, tree)


def test_header_shape_edit_is_caught(tmp_path):
    tree = {"w": jnp.ones((3, 4), jnp.float32)}
    path = ckpt.save(tmp_path / "c.safetensors", tree)
    _edit_header(path, '"shape":[3,4]', '"shape":[4,3]')
    with pytest.raises(ckpt.CheckpointError, match="c.safetensors"):
        ckpt.load(path, tree)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path)


def test_metadata_edit_is_caught(tmp_path):
    path = ckpt.save(tmp_path / "c.safetensors", {"w": jnp.ones(2)}, metadata={"model": "cnn"})
    raw = open(path, "rb").read()
    open(path, "wb").write(raw.replace(b"cnn", b"mlp"))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_metadata(path)


@pytest.mark.parametrize("content, what", [
    (b"", "truncated"),
    (b"\x00" * 3, "truncated"),
    (b"hello world, not a checkpoint", "truncated or not a safetensors"),
    (struct.pack("<Q", 4) + b"[1] ", "__metadata__"),
    (struct.pack("<Q", 8) + b"{\"a\":1} ", "__metadata__"),
])
def test_malformed_files_name_the_path(tmp_path, content, what):
    path = str(tmp_path / "ckpt_00000001.safetensors")
    open(path, "wb").write(content)
    with pytest.raises(ckpt.CheckpointError, match=what) as e:
        ckpt.load(path)
    assert path in str(e.value)


def test_directory_and_missing_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ckpt.load(tmp_path / "nope.safetensors")


def _v1_bytes(arrays: dict) -> bytes:
    """A version-1 file, as fdl wrote before the checksum covered the header."""
    leaves, h, header, off = [], hashlib.sha256(), {}, 0
    for name, a in arrays.items():
        leaves.append({"path": name, "shape": list(a.shape), "dtype": a.dtype.name,
                       "kind": "array"})
        h.update(a.tobytes())
    doc = {"format": "fdl-checkpoint", "version": 1, "leaves": leaves,
           "sha256": h.hexdigest(), "metadata": {"model": "old"}}
    header["__metadata__"] = {"fdl": json.dumps(doc, sort_keys=True)}
    for name, a in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + b"".join(a.tobytes() for a in arrays.values())


def test_version_1_files_are_read_and_cross_checked(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = str(tmp_path / "v1.safetensors")
    open(path, "wb").write(_v1_bytes({"w": w}))
    np.testing.assert_array_equal(ckpt.load(path, {"w": jnp.zeros((3, 4), jnp.float32)})["w"], w)
    assert ckpt.load_metadata(path) == {"model": "old"}
    _edit_header(path, '"dtype":"F32"', '"dtype":"I32"')  # the header, not the description
    with pytest.raises(ckpt.CheckpointError, match="dtype 'I32' in the header"):
        ckpt.load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_fuzz_flips_and_truncations(tmp_path, suffix):
    """Every single-byte flip or truncation either raises CheckpointError or loads exactly
    the saved tree (with and without a template)."""
    tree = _small_tree()
    path = str(ckpt.save(tmp_path / f"c{suffix}", tree, metadata={"model": "m"}))
    raw = open(path, "rb").read()
    rng = np.random.default_rng(0)
    cases = [("flip", int(i), int(rng.integers(1, 256)))
             for i in rng.integers(0, len(raw), 250 if suffix == ".safetensors" else 120)]
    cases += [("cut", int(n), 0) for n in rng.integers(0, len(raw), 40)]
    bad = []
    for kind, i, x in cases:
        b = bytearray(raw)
        if kind == "flip":
            b[i] ^= x
        else:
            b = b[:i]
        p = str(tmp_path / f"f{suffix}")
        open(p, "wb").write(bytes(b))
        for template in (tree, None):
            try:
                back = ckpt.load(p, template)
            except ckpt.CheckpointError as e:
                if p not in str(e):
                    bad.append((kind, i, x, "message without the path", str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - the point of the test
                bad.append((kind, i, x, type(e).__name__, str(e)[:200]))
                continue
            want = tree if template is not None else ckpt.load(path)
            if not _same(back, want):
                bad.append((kind, i, x, "loaded a different tree", ""))
    assert not bad, bad[:5]


def _write_steps(directory, steps, value=None):
    m = ckpt.CheckpointManager(directory, keep=10)
    for s in steps:
        m.save(s, {"w": jnp.full(2, float(s if value is None else value), jnp.float32)})
    return m


def test_latest_valid_skips_corrupt_and_stray_files(tmp_path):
    m = _write_steps(tmp_path, [10, 20, 30])
    open(m.path_for(40), "wb").close()  # a stray zero-byte file
    raw = bytearray(open(m.path_for(30), "rb").read())
    raw[-1] ^= 1
    open(m.path_for(30), "wb").write(bytes(raw))
    skipped = []
    assert ckpt.latest_valid(tmp_path, lambda p, why: skipped.append((p, why))) == m.path_for(20)
    assert [p for p, _ in skipped] == [m.path_for(40), m.path_for(30)]
    assert "truncated" in skipped[0][1] and "checksum" in skipped[1][1]
    with pytest.warns(RuntimeWarning, match="skipped .*ckpt_00000040"):
        back = m.restore({"w": jnp.zeros(2, jnp.float32)})
    np.testing.assert_array_equal(back["w"], 20.0)
    assert ckpt.latest_valid(tmp_path / "empty") is None


def test_rotation_never_deletes_the_writing_runs_checkpoints(tmp_path):
    _write_steps(tmp_path, [69, 138, 207], value=-1)  # an earlier, longer run
    m = ckpt.CheckpointManager(tmp_path, keep=3)
    for s in (23, 46):
        path = m.save(s, {"w": jnp.full(2, float(s), jnp.float32)})
        assert os.path.exists(path)
    assert [s for s, _ in m.all()] == [23, 46, 69, 138, 207]
    for s in (69, 92, 115):  # overwriting 69, then rotating within this run
        m.save(s, {"w": jnp.full(2, float(s), jnp.float32)})
    assert [s for s, _ in m.all()] == [69, 92, 115, 138, 207]


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = ckpt.save(tmp_path / "c.safetensors", {"w": jnp.ones(2)})
    finally:
        os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o644
