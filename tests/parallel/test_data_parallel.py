"""Sharded-jit and pmap data-parallel steps equal the single-device step on the global batch
(8 simulated CPU devices), with and without BatchNorm."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn, optim
from fdl.parallel import (
    data_mesh,
    make_pmap_eval_step,
    make_pmap_train_step,
    make_sharded_eval_step,
    make_sharded_train_step,
    replicate,
    shard_batch,
    split_batch,
    unreplicate,
)
from fdl.train import make_eval_step, make_train_step

N_DEV = 8


def cnn(bn_axis=None, bn=True):
    # no conv bias before BN: its true gradient is 0 and Adam would amplify rounding noise
    layers = [("conv", nn.conv2d(4, 3, padding=1, use_bias=not bn))]
    if bn:
        layers.append(("bn", nn.batch_norm(axis_name=bn_axis)))
    layers += [("act", nn.relu()), ("pool", nn.avg_pool2d(2)), ("flat", nn.flatten()),
               ("fc", nn.dense(3))]
    return nn.serial(*layers)


def _data(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    return x, y


@pytest.fixture(scope="module")
def devices_ok():
    if jax.local_device_count() < N_DEV:
        pytest.skip("needs 8 (simulated) devices")


def _single(model, params, state, opt, batch, steps=2):
    step = make_train_step(model, opt, donate=False)
    o = opt.init(params)
    p, s = params, state
    for i in range(steps):
        p, s, o, m = step(p, s, o, batch, jax.random.key(i))
    return p, s, m


def _close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("bn", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_jit_equals_single_device(devices_ok, bn):
    model = cnn(bn=bn)
    _, params, state = model.init(jax.random.key(0), (1, 6, 6, 2))
    opt = optim.sgd(0.1, momentum=0.9)
    batch = _data()
    p1, s1, m1 = _single(model, params, state, opt, batch)

    mesh = data_mesh()
    assert mesh.devices.size == N_DEV
    step = make_sharded_train_step(model, opt, mesh=mesh, donate=False)
    p, s, o = params, state, opt.init(params)
    sb = shard_batch(batch, mesh)
    assert len(sb[0].sharding.device_set) == N_DEV
    for i in range(2):
        p, s, o, m = step(p, s, o, sb, jax.random.key(i))
    _close(p, p1)
    _close(s, s1)
    _close(m, m1)
    ev = make_sharded_eval_step(model, mesh=mesh)(p, s, sb)
    _close(ev, make_eval_step(model)(p1, s1, batch), rtol=1e-4)


@pytest.mark.parametrize("bn", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_pmap_equals_single_device(devices_ok, bn):
    single_model = cnn(bn=bn)
    pmap_model = cnn(bn_axis="data", bn=bn)  # BN statistics over the global batch
    _, params, state = single_model.init(jax.random.key(0), (1, 6, 6, 2))
    opt = optim.adam(0.01)
    batch = _data()
    p1, s1, m1 = _single(single_model, params, state, opt, batch)

    step = make_pmap_train_step(pmap_model, opt, donate=False)
    p, s, o = replicate(params), replicate(state), replicate(opt.init(params))
    pb = split_batch(batch)
    for i in range(2):
        p, s, o, m = step(p, s, o, pb, jax.random.key(i))
    # replicas stay identical
    for leaf in jax.tree.leaves(p):
        np.testing.assert_array_equal(leaf[0], leaf[-1])
    _close(unreplicate(p), p1)
    _close(unreplicate(s), s1)
    _close(unreplicate(m), m1)
    ev = make_pmap_eval_step(pmap_model)(p, s, pb)
    _close(unreplicate(ev), make_eval_step(single_model)(p1, s1, batch), rtol=1e-4)


def test_pmap_padding_mask_gives_global_gradient(devices_ok):
    model = cnn(bn=False)
    _, params, state = model.init(jax.random.key(0), (1, 6, 6, 2))
    opt = optim.sgd(0.5)
    x, y = _data(16)
    mask = np.ones(16, np.float32)
    mask[11:] = 0  # last shards partly / fully padding
    p1, _, m1 = _single(model, params, state, opt, (x[:11], y[:11]), steps=1)
    step = make_pmap_train_step(model, opt, donate=False)
    p, _, _, m = step(replicate(params), replicate(state), replicate(opt.init(params)),
                      split_batch((x, y, mask)), jax.random.key(0))
    _close(unreplicate(p), p1)
    assert float(unreplicate(m)["count"]) == 11


def test_bad_device_counts():
    with pytest.raises(ValueError, match="devices must be between 1"):
        data_mesh(10_000)
    with pytest.raises(ValueError, match="not divisible"):
        split_batch(jnp.ones((6, 2)), 4)


def test_sharded_step_partitions_convolutions(devices_ok):
    """float32, the default backend: each device convolves its own shard -- with fdl's native
    kernels, the oneDNN custom calls run on the per-device batch and the kernel gradients are
    summed (custom_partitioning), nothing is all-gathered -- and
    the sharded step equals the single-device step."""
    from fdl._ext import loader

    model = cnn()
    _, params, state = model.init(jax.random.key(0), (1, 6, 6, 2))
    params, state = jax.tree.map(lambda a: a.astype(jnp.float32), (params, state))
    opt = optim.sgd(0.1, momentum=0.9)
    mesh = data_mesh()
    sb = shard_batch(_data(), mesh)
    step = make_sharded_train_step(model, opt, mesh=mesh, donate=False)
    hlo = step.lower(params, state, opt.init(params), sb, jax.random.key(0)).compile().as_text()
    assert "all-gather" not in hlo
    native = loader.load("conv").loaded
    # (the only conv is the first layer: no input gradient, so no backward-data call)
    assert ("fdl_conv_fwd" in hlo) == native and ("fdl_conv_bwd_weights" in hlo) == native
    batched = [line for line in hlo.splitlines()
               if " convolution(" in line or "fdl_conv_fwd" in line]
    assert batched and all(f"f32[{16 // N_DEV}," in c for c in batched
                           if "custom-call(" in c or " convolution(" in c)
    # the devices' shards run at the same time: each call gets its share of the cores, unlocked
    threads = max(1, len(os.sched_getaffinity(0)) // N_DEV)
    calls = [line for line in hlo.splitlines() if 'custom_call_target="fdl_conv' in line]
    assert all(f"threads = {threads} : i64" in c for c in calls), calls
    ev = make_sharded_eval_step(model, mesh=mesh)
    assert "all-gather" not in ev.lower(params, state, sb).compile().as_text()
    p1, s1, m1 = _single(model, params, state, opt, _data())
    p, s, o = params, state, opt.init(params)
    for i in range(2):
        p, s, o, m = step(p, s, o, sb, jax.random.key(i))
    _close((p, s, m), (p1, s1, m1), rtol=2e-4, atol=2e-5)


def test_shard_threads_split_the_cores(devices_ok):
    """One device: 0 (every core, calls serialised); k devices of this process: cores // k,
    at least 1."""
    from fdl.nn.conv_lowering import _shard_threads

    cores = len(os.sched_getaffinity(0))
    assert _shard_threads(jax.sharding.Mesh(jax.devices()[:1], ("data",))) == 0
    for k in (2, N_DEV):
        mesh = jax.sharding.Mesh(jax.devices()[:k], ("data",))
        assert _shard_threads(mesh) == max(1, cores // k)


@pytest.mark.parametrize("backend", ["auto", "xla"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_sharded_step_partitions_rnn_loops(devices_ok, kind, backend):
    """Under a sharded jit the LSTM/GRU loops run per device on the batch shard -- the native
    calls (their weight gradients summed over the batch axis) and the XLA loops alike --,
    no activation is all-gathered, and the step equals the single-device step."""
    from fdl import config
    from fdl._ext import loader

    with config.override(rnn_backend=backend):
        _check_sharded_rnn_step(kind, native=backend == "auto" and loader.load("rnn").loaded)


def _check_sharded_rnn_step(kind, native):
    vocab = 11
    model = nn.serial(("embed", nn.embedding(vocab, 8)), ("rnn", getattr(nn, kind)(16)),
                      ("out", nn.dense(vocab)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, vocab, (16, 5)), jnp.int32)
    y = jnp.asarray(rng.integers(0, vocab, (16, 5)), jnp.int32)
    _, params, state = model.init(jax.random.key(0), x.shape)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    opt = optim.sgd(0.5)
    mesh = data_mesh()
    sb = shard_batch((x, y), mesh)
    step = make_sharded_train_step(model, opt, mesh=mesh, donate=False)
    hlo = step.lower(params, state, opt.init(params), sb, jax.random.key(1)).compile().as_text()
    # The only gathers: the final carry (B, layers, hidden), layer state replicated like all
    # state of the sharded step; no activation (T, B, .) is gathered.
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert all(line.split("=", 1)[1].lstrip().startswith("f32[16,1,16]") for line in gathers), \
        gathers
    calls = [line for line in hlo.splitlines() if "custom-call(" in line and "fdl_" in line]
    assert native or not calls
    if native:
        assert any(f"fdl_{kind}_fwd" in c for c in calls)
        assert any(f"fdl_{kind}_bwd_dw" in c for c in calls)
        assert all(f"f32[5,{16 // N_DEV}," in c for c in calls)  # (T, per-device batch, .)
    one = make_train_step(model, opt, donate=False)(params, state, opt.init(params), (x, y),
                                                    jax.random.key(1))
    _close(step(params, state, opt.init(params), sb, jax.random.key(1)), one, rtol=1e-4,
           atol=1e-6)
