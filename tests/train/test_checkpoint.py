"""Checkpoints: bitwise round trip, atomicity under a crash, template validation, corruption."""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.train import checkpoint as ckpt


class AdamLike(NamedTuple):
    count: jax.Array
    mu: dict
    nu: dict


def _tree(seed=0):
    k = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(k, 3)
    params = {
        "conv1": {"w": jax.random.normal(k1, (3, 3, 1, 4), jnp.float32), "b": jnp.zeros(4)},
        "fc": {"w": jax.random.normal(k2, (5, 2), jnp.float64),
               "h": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
    }
    return {
        "params": params,
        "state": {"bn": {"mean": jnp.ones(4, jnp.float32), "count": jnp.int32(7)}},
        "opt_state": AdamLike(jnp.int32(3), jax.tree.map(jnp.zeros_like, params),
                              jax.tree.map(jnp.ones_like, params)),
        "step": 123,
        "lr": 0.5,
        "flag": jnp.array([True, False]),
        "key": k3,
        "epoch_keys": jax.random.split(jax.random.key(9), 3),
        "list": [jnp.uint8(4), jnp.int64(-5)],
    }


def _assert_bitwise(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(x) is type(y) or hasattr(x, "dtype")
        xa, ya = np.asarray(x), np.asarray(y)
        assert xa.dtype == ya.dtype and xa.shape == ya.shape
        assert xa.tobytes() == ya.tobytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_bitwise(tmp_path, suffix):
    tree = _tree()
    path = ckpt.save(tmp_path / f"c{suffix}", tree, metadata={"model": "x", "n": 3})
    back = ckpt.load(path, tree)
    _assert_bitwise(tree, back)
    assert isinstance(back["opt_state"], AdamLike)
    assert back["step"] == 123 and isinstance(back["step"], int)
    assert ckpt.load_metadata(path) == {"model": "x", "n": 3}
    # restored keys are usable keys
    jax.random.normal(back["key"], (2,))


def test_load_without_template_gives_nested_dict(tmp_path):
    tree = _tree()
    path = ckpt.save(tmp_path / "c.safetensors", tree)
    raw = ckpt.load(path)
    np.testing.assert_array_equal(raw["params"]["conv1"]["w"], tree["params"]["conv1"]["w"])
    np.testing.assert_array_equal(raw["opt_state"]["mu"]["fc"]["w"], 0.0)
    assert raw["list"]["1"] == -5


def test_template_of_shape_dtype_structs(tmp_path):
    tree = _tree()
    path = ckpt.save(tmp_path / "c.safetensors", tree)
    template = jax.eval_shape(lambda: _tree())
    template["step"], template["lr"] = 0, 0.0
    _assert_bitwise(tree, ckpt.load(path, template))


def test_readable_by_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tree = {"a": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": np.int64(3)}
    path = ckpt.save(tmp_path / "c.safetensors", tree)
    out = st.load_file(path)
    np.testing.assert_array_equal(out["a/w"], tree["a"]["w"])
    assert int(out["b"]) == 3


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = _tree(0)
    ckpt.save(path, old)
    before = sorted(os.listdir(tmp_path))

    def crashing_writer(f, chunks):
        chunks = list(chunks)
        f.write(chunks[0])
        f.write(chunks[1][: len(chunks[1]) // 2])
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(ckpt, "_write_chunks", crashing_writer)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(path, _tree(1))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # temp file cleaned up
    _assert_bitwise(old, ckpt.load(path, old))


def test_mismatched_template_names_every_path(tmp_path):
    tree = {"conv1": {"w": jnp.zeros((3, 3, 1, 6), jnp.float32)},
            "fc": {"w": jnp.zeros((4, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}}
    path = ckpt.save(tmp_path / "c.safetensors", tree)
    other = {"conv1": {"w": jnp.zeros((5, 5, 1, 6), jnp.float32)},
             "fc": {"w": jnp.zeros((4, 2), jnp.float64)},
             "extra": {"w": jnp.zeros(1)}}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path, other)
    msg = str(e.value)
    assert "conv1/w: shape (3, 3, 1, 6) in checkpoint, template (5, 5, 1, 6)" in msg
    assert "fc/w: dtype float32 in checkpoint, template float64" in msg
    assert "fc/b: in the checkpoint but not in the template" in msg
    assert "extra/w: in the template but missing" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_corruption_detected(tmp_path, suffix):
    tree = {"w": jnp.arange(64, dtype=jnp.float32)}
    path = str(ckpt.save(tmp_path / f"c{suffix}", tree))
    raw = bytearray(open(path, "rb").read())
    if suffix == ".safetensors":
        raw[-10] ^= 0xFF  # flip a data byte
    else:
        raw = raw[: len(raw) // 2]  # truncate the zip
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load(path, tree)


def test_truncated_safetensors(tmp_path):
    path = str(ckpt.save(tmp_path / "c.safetensors", {"w": jnp.ones(100, jnp.float32)}))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-40])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load(path)


def test_unsupported_leaf_refused(tmp_path):
    with pytest.raises(TypeError, match="'a/name'"):
        ckpt.save(tmp_path / "c.safetensors", {"a": {"name": "hello"}})


def test_manager_keeps_last_n(tmp_path):
    m = ckpt.CheckpointManager(tmp_path / "run", keep=2)
    assert m.latest() is None and ckpt.latest(tmp_path / "run") is None
    for step in (10, 20, 30):
        m.save(step, {"w": jnp.full(3, step, jnp.float32)}, metadata={"step": step})
    assert [s for s, _ in m.all()] == [20, 30]
    assert m.latest().endswith("ckpt_00000030.safetensors")
    np.testing.assert_array_equal(m.restore({"w": jnp.zeros(3, jnp.float32)})["w"], 30.0)
    with pytest.raises(ValueError, match="keep"):
        ckpt.CheckpointManager(tmp_path, keep=0)
