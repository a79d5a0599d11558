"""fdl.nn.matmul: the native (oneDNN sgemm) product equals XLA's dot in values, gradients of
every order, jvp and vmap; dispatch (dtype, size, config, sharding); GPU/TPU lowering."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdl import config, nn
from fdl.nn import heads_matmul as hm
from fdl.nn import matmul as mm
from fdl.testing import check_lowers_on_all_platforms

# large enough to take the native path (M*N*K >= NATIVE_MIN_FLOPS)
M, K, N = 96, 128, 112


@pytest.fixture(scope="module", autouse=True)
def native():
    if not mm.native_available():
        pytest.skip("the native dense library is not available on this machine")


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _uses_native(fn, *args) -> bool:
    return "fdl_matmul" in jax.jit(fn).lower(*args).as_text()


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
def test_primitive_each_transpose_form(ta, tb):
    a = _rand((K, M) if ta else (M, K), 0)
    b = _rand((N, K) if tb else (K, N), 1)
    got = jax.jit(lambda a, b: mm._mm(a, b, ta, tb))(a, b)
    want = (a.T if ta else a) @ (b.T if tb else b)
    assert got.shape == (M, N)
    _close(got, want)
    # gradients through every form (the transpose rules pick other forms)
    ct = _rand((M, N), 2)
    g = jax.grad(lambda a, b: jnp.vdot(mm._mm(a, b, ta, tb), ct), (0, 1))(a, b)
    r = jax.grad(lambda a, b: jnp.vdot(mm._xla_impl(a, b, ta=ta, tb=tb), ct), (0, 1))(a, b)
    for x, y in zip(g, r, strict=True):
        _close(x, y)


@settings(max_examples=6, deadline=None)
@given(lead=st.sampled_from([(96,), (3, 40), (2, 3, 20)]), transpose_w=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matmul_equals_xla_with_grad_jvp_and_hvp(lead, transpose_w, seed):
    x = _rand((*lead, K), seed)
    w = _rand((N, K) if transpose_w else (K, N), seed + 1)
    v = _rand(w.shape, seed + 2)
    f = lambda x, w: mm.matmul(x, w, transpose_w=transpose_w)  # noqa: E731

    def xla(x, w):
        with config.override(dense_backend="xla"):
            return f(x, w)

    assert _uses_native(f, x, w) and not _uses_native(xla, x, w)
    _close(jax.jit(f)(x, w), xla(x, w))

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.tanh(fn(x, w)) ** 2)

    for got, want in zip(jax.grad(loss(f), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w),
                         strict=True):
        _close(got, want)
    _close(jax.jvp(lambda w: f(x, w), (w,), (v,))[1], jax.jvp(lambda w: xla(x, w), (w,), (v,))[1])
    hvp = jax.jvp(jax.grad(lambda w: loss(f)(x, w)), (w,), (v,))[1]
    _close(hvp, jax.jvp(jax.grad(lambda w: loss(xla)(x, w)), (w,), (v,))[1])


def test_vmap_folds_a_batched_input_and_maps_batched_weights():
    x = _rand((4, 24, K), 0)
    w = _rand((K, N), 1)
    ws = _rand((4, K, N), 2)
    _close(jax.vmap(lambda x: mm.matmul(x, w))(x), x @ w)
    _close(jax.vmap(mm.matmul)(x, ws), jnp.einsum("bmk,bkn->bmn", x, ws))
    # per-example weight gradients: both operands of the weight-gradient product batched
    per_ex = jax.vmap(jax.grad(lambda w, x: jnp.sum(mm.matmul(x, w) ** 2)), (None, 0))(w, x)
    want = jax.vmap(jax.grad(lambda w, x: jnp.sum((x @ w) ** 2)), (None, 0))(w, x)
    _close(per_ex, want)


def test_dispatch_dtype_size_and_config():
    x, w = _rand((M, K), 0), _rand((K, N), 1)
    assert _uses_native(mm.matmul, x, w)
    small = (_rand((4, 8), 0), _rand((8, 3), 1))
    assert not _uses_native(mm.matmul, *small)  # below NATIVE_MIN_FLOPS: XLA's dot
    with jax.enable_x64(True):
        x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
        assert not _uses_native(mm.matmul, x64, w64)
        assert mm.matmul(x64, w64).dtype == jnp.float64
    with config.override(dense_backend="xla"):  # (read at trace time: a fresh function)
        assert not _uses_native(lambda x, w: mm.matmul(x, w), x, w)
    with pytest.raises(ValueError, match=r"matmul: x \(96, 128\) and w \(112, 128\)"):
        mm.matmul(x, _rand((N, K), 2))


def test_dense_layer_uses_it():
    layer = nn.dense(N)
    _, params, _ = layer.init(jax.random.key(0), (M, K))
    x = _rand((M, K), 3)
    assert _uses_native(lambda p, x: layer.apply(p, {}, x)[0], params, x)


def test_lowers_for_gpu_and_tpu_without_the_custom_call():
    x, w = _rand((M, K), 0), _rand((K, N), 1)
    step = jax.grad(lambda w, x: jnp.sum(mm.matmul(x, w) ** 2))
    texts = check_lowers_on_all_platforms(step, w, x)
    assert "fdl_matmul" in texts["all"]  # the CPU branch of the multi-platform module


def test_sharded_jit_uses_xla_dot_and_equals_single_device():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = min(len(jax.devices()), 8)
    if n < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = jax.make_mesh((n,), ("data",))
    x, w = _rand((n * 16, K), 0), _rand((K, N), 1)
    loss = lambda w, x: jnp.sum(jnp.tanh(mm.matmul(x, w)) ** 2)  # noqa: E731
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    step = jax.jit(jax.value_and_grad(loss))
    assert "fdl_matmul" not in step.lower(ws, xs).compile().as_text()
    (l1, g1), (l2, g2) = step(ws, xs), jax.value_and_grad(loss)(w, x)
    _close(l1, l2)
    _close(g1, g2)


# ----------------------------------------------------------------------------- heads products

B, H, TQ, TK, D = 3, 4, 10, 12, 16


def _xla_heads(kind):
    return lambda a, b: jnp.einsum(hm._EINSUM[kind], a, b)


@pytest.mark.parametrize("kind", [hm.SCORES, hm.APPLY, hm.APPLY_T])
def test_heads_kinds_equal_einsum_with_gradients(kind):
    shapes = {hm.SCORES: ((B, TQ, H, D), (B, TK, H, D)),
              hm.APPLY: ((B, H, TQ, TK), (B, TK, H, D)),
              hm.APPLY_T: ((B, H, TQ, TK), (B, TQ, H, D))}[kind]
    a, b = _rand(shapes[0], 0), _rand(shapes[1], 1)
    f = jax.jit(lambda a, b: hm._hm(kind, a, b))
    assert "fdl_heads_matmul" in f.lower(a, b).as_text()
    want = _xla_heads(kind)(a, b)
    _close(f(a, b), want)
    ct = _rand(want.shape, 2)
    g = jax.grad(lambda a, b: jnp.vdot(hm._hm(kind, a, b), ct), (0, 1))(a, b)
    r = jax.grad(lambda a, b: jnp.vdot(_xla_heads(kind)(a, b), ct), (0, 1))(a, b)
    for x, y in zip(g, r, strict=True):
        _close(x, y)


def _attention(scores_fn, apply_fn):
    def fn(q, k, v):
        w = jax.nn.softmax(scores_fn(q, k), axis=-1)
        return jnp.sum(jnp.tanh(apply_fn(w, v)) ** 2)

    return fn


def test_heads_attention_second_order_and_vmap_equal_xla():
    q, k, v = _rand((B, TQ, H, D), 0), _rand((B, TK, H, D), 1), _rand((B, TK, H, D), 2)
    dq = _rand(q.shape, 3)
    nat = _attention(hm.scores, hm.apply_weights)
    ref = _attention(_xla_heads(hm.SCORES), _xla_heads(hm.APPLY))
    assert "fdl_heads_matmul" in jax.jit(jax.grad(nat)).lower(q, k, v).as_text()
    for got, want in zip(jax.grad(nat, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v),
                         strict=True):
        _close(got, want)
    hvp = jax.jvp(jax.grad(nat), (q, k, v), (dq, dq[:, :1].repeat(TK, 1) * 0, v * 0))[1]
    want = jax.jvp(jax.grad(ref), (q, k, v), (dq, dq[:, :1].repeat(TK, 1) * 0, v * 0))[1]
    _close(hvp, want)
    qs = jnp.stack([q, q * 2])
    _close(jax.vmap(nat, (0, None, None))(qs, k, v), jax.vmap(ref, (0, None, None))(qs, k, v))


def test_heads_products_lower_for_gpu_and_tpu_and_fall_back():
    q, k, v = _rand((B, TQ, H, D), 0), _rand((B, TK, H, D), 1), _rand((B, TK, H, D), 2)
    texts = check_lowers_on_all_platforms(jax.grad(_attention(hm.scores, hm.apply_weights)),
                                          q, k, v)
    assert "fdl_heads_matmul" in texts["all"]
    with config.override(dense_backend="xla"):
        assert "fdl_heads" not in jax.jit(lambda q, k: hm.scores(q, k)).lower(q, k).as_text()
    with jax.enable_x64(True):
        q64 = q.astype(jnp.float64)
        assert "fdl_heads" not in jax.jit(lambda q: hm.scores(q, q)).lower(q64).as_text()


def test_self_attention_layer_uses_heads_products():
    layer = nn.self_attention(H, H * D)
    _, params, _ = layer.init(jax.random.key(0), (B, TQ, H * D))
    x = _rand((B, TQ, H * D), 4)
    assert "fdl_heads_matmul" in jax.jit(
        lambda p, x: layer.apply(p, {}, x)[0][0]).lower(params, x).as_text()
