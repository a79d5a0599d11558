"""Training-mode batch norm on fdl's native kernels (fdl.nn.norm_lowering): the same values,
state and gradients as XLA's form (and PyTorch's), derivatives of every order against finite
differences, vmap, sharded jit, export for GPU/TPU, and the refusals."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdl import config, nn
from fdl._ext import loader
from fdl.nn import norm_lowering
from fdl.testing import check_gradients, check_lowers_on_all_platforms


@pytest.fixture(scope="module")
def native():
    """The native library, taken for inputs of any size (the tests' inputs are small)."""
    if not loader.load("norm").loaded:
        pytest.skip("the native batch norm library is unavailable here")
    saved = norm_lowering.MIN_ELEMENTS
    norm_lowering.MIN_ELEMENTS = 0
    yield
    norm_lowering.MIN_ELEMENTS = saved


def _data(shape, seed=0, loc=0.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape, jnp.float32) * 2.0 + loc
    ct = jax.random.normal(k2, shape, jnp.float32)
    return x, ct


def _layer_step(layer, params, state, x, ct):
    """Output, new state and the gradients (params, x) of ``vdot(y, ct)``: train mode."""
    def loss(p, xx):
        y, s = layer.apply(p, state, xx, train=True)
        return jnp.vdot(y, ct), (y, s)

    (_, (y, s)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return y, s, grads


def _close(a, b, tol=2e-5):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        scale = max(float(jnp.abs(v).max()), 1.0)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol * scale)


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def _calls(text: str) -> set[str]:
    """The native batch-norm custom calls in a StableHLO or HLO module's text."""
    return set(re.findall(r'(?:custom_call @|custom_call_target=")(fdl_batch_norm_\w+)', text))


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(2, 300), channels=st.integers(2, 9).map(lambda k: 8 * k),
       relu=st.booleans(),
       loc=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**16))
def test_native_equals_xla_layer(native, rows, channels, relu, loc, seed):
    """The layer's output, new running statistics and gradients (params and input) on the
    native kernels equal XLA's form (float32), and both equal the float64 computation, for any
    rows, the channel counts it takes, and a large mean."""
    layer = nn.batch_norm(relu=relu)
    x, ct = _data((rows, channels), seed, loc)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    params = {"scale": params["scale"] + 0.3, "offset": params["offset"] - 0.2}
    out = {}
    for backend in ("native", "xla"):
        with config.override(norm_backend=backend):
            # a fresh function per backend: jit's trace cache is keyed on the function, not on
            # fdl.config, so one shared jitted function would reuse the first backend's trace
            lowered = jax.jit(lambda p, s, xx, c: _layer_step(layer, p, s, xx, c)).lower(
                params, state, x, ct)
            out[backend] = lowered.compile()(params, state, x, ct)
        assert _calls(lowered.as_text()) == ({"fdl_batch_norm_fwd", "fdl_batch_norm_bwd"}
                                             if backend == "native" else set())
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        want = jax.jit(lambda p, s, xx, c: _layer_step(layer, p, s, xx, c))(
            f64(params), f64(state), f64(x), f64(ct))
    # (two rows a mean 15 std apart make the input gradient ill-conditioned in float32: ~1e-4)
    _close(out["native"], want, tol=2e-4)
    _close(out["native"], out["xla"], tol=4e-4)


@pytest.mark.parametrize("use_scale,use_offset", [(True, False), (False, True), (False, False)])
def test_native_without_scale_or_offset(native, use_scale, use_offset):
    layer = nn.batch_norm(use_scale=use_scale, use_offset=use_offset, relu=True)
    x, ct = _data((4, 5, 5, 16), 3)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    out = {}
    for backend in ("native", "xla"):
        with config.override(norm_backend=backend):
            out[backend] = jax.jit(lambda p, s, xx, c: _layer_step(layer, p, s, xx, c))(
                params, state, x, ct)
    _close(out["native"], out["xla"], tol=5e-5)


def test_relu_flag_equals_separate_relu():
    """``batch_norm(relu=True)`` is ``serial(batch_norm(), relu())``: train and eval, state."""
    x, ct = _data((8, 3, 3, 16), 5)
    fused = nn.batch_norm(relu=True)
    separate = nn.serial(("bn", nn.batch_norm()), ("act", nn.relu()))
    _, params, state = fused.init(jax.random.key(0), x.shape)
    for train in (True, False):
        y1, s1 = fused.apply(params, state, x, train=train)
        y2, s2 = separate.apply({"bn": params}, {"bn": state}, x, train=train)
        _close((y1, s1), (y2, s2["bn"]), tol=1e-6)


def test_derivatives_float64_all_orders():
    """The primitives' JVP map and its transpose (the backward) against finite differences,
    forward and reverse mode, first and second order (Hessian-vector products), float64 (the
    XLA form of the same primitives: the native kernels are float32)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(6, 3)) * 1.5 + 0.5)
        scale = jnp.asarray(rng.normal(size=3))
        offset = jnp.asarray(rng.normal(size=3))
        for relu in (False, True):
            def f(x, scale, offset, relu=relu):
                y, mean, var = norm_lowering.batch_norm_train(x, scale, offset, 1e-3, relu)
                return y, mean, var

            check_gradients(f, (x, scale, offset), order=2, modes=("fwd", "rev"),
                            atol=1e-5, rtol=1e-5)


def test_native_second_order_equals_xla(native):
    """jvp of grad (Hessian-vector product) through the native step equals XLA's form."""
    x, ct = _data((64, 8), 7)
    scale = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32)
    offset = jnp.linspace(-0.2, 0.3, 8, dtype=jnp.float32)
    v = jnp.cos(x)

    def loss(x, fn):
        y, mean, var = fn(x, scale, offset)
        return jnp.vdot(y, ct) + jnp.sum(mean * 0.3) + jnp.sum(jnp.sin(var))

    def native_fn(x, s, o):
        return norm_lowering.batch_norm_train(x, s, o, 1e-5, True)

    def xla_fn(x, s, o):
        return norm_lowering._forward_xla(x, s, o, eps=1e-5, relu=True)

    def hvp(fn):
        return jax.jit(lambda x: jax.jvp(jax.grad(lambda x: loss(x, fn)), (x,), (v,)))(x)

    _close(hvp(native_fn), hvp(xla_fn), tol=1e-4)
    assert "fdl_batch_norm_bwd" in _calls(_hlo(jax.grad(lambda x: loss(x, native_fn)), x))


def test_vmap_equals_loop(native):
    """vmap over independent batches (each its own statistics) equals one call per batch."""
    x, ct = _data((3, 10, 4), 9)
    scale, offset = jnp.ones(4, jnp.float32) * 1.2, jnp.full(4, 0.1, jnp.float32)

    def step(x, ct):
        def loss(x, s, o):
            y, m, v = norm_lowering.batch_norm_train(x, s, o, 1e-5, True)
            return jnp.vdot(y, ct) + jnp.sum(m) + jnp.sum(v)
        return jax.grad(loss, (0, 1, 2))(x, scale, offset)

    got = jax.jit(jax.vmap(step))(x, ct)
    want = [jax.jit(step)(x[i], ct[i]) for i in range(3)]
    _close(got, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *want), tol=2e-5)


def test_sharded_jit_uses_global_statistics(native):
    """Under a jit sharded over 8 devices the statistics are the global batch's (XLA's form,
    partitioned by XLA), equal to the single-device native step."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]), ("batch",))
    layer = nn.batch_norm(relu=True)
    x, ct = _data((16, 4, 4, 16), 11)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    step = jax.jit(lambda p, s, xx, c: _layer_step(layer, p, s, xx, c))
    single = step(params, state, x, ct)
    shard = NamedSharding(mesh, P("batch"))
    xs, cts = jax.device_put(x, shard), jax.device_put(ct, shard)
    text = jax.jit(lambda p, s, xx, c: _layer_step(layer, p, s, xx, c)).lower(
        params, state, xs, cts).compile().as_text()
    assert not _calls(text)
    _close(step(params, state, xs, cts), single, tol=5e-5)


def test_exports_for_gpu_and_tpu(native):
    layer = nn.batch_norm(relu=True)
    x, ct = _data((4, 3, 3, 16), 13)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    texts = check_lowers_on_all_platforms(
        lambda p, s, xx, c: _layer_step(layer, p, s, xx, c), params, state, x, ct)
    assert "fdl_batch_norm_fwd" in _calls(texts["all"])


def test_other_dtypes_and_eval_use_xla(native):
    layer = nn.batch_norm(relu=True)
    _, params, state = layer.init(jax.random.key(0), (4, 16))
    x16 = jnp.ones((4, 16), jnp.bfloat16)
    x32 = jnp.ones((4, 16), jnp.float32)
    assert not _calls(_hlo(lambda x: layer.apply(params, state, x, train=True), x16))
    assert not _calls(_hlo(lambda x: layer.apply(params, state, x), x32))
    assert _calls(_hlo(lambda x: layer.apply(params, state, x, train=True), x32))
    with config.override(norm_backend="xla"):
        assert not _calls(_hlo(lambda x: layer.apply(params, state, x, train=True), x32))
    few = nn.batch_norm()  # channels the native loops would leave lanes idle for: XLA
    for c in (6, 12, 20):
        _, p, s = few.init(jax.random.key(0), (4, c))
        assert not _calls(_hlo(lambda x: few.apply(p, s, x, train=True),
                               jnp.ones((4, c), jnp.float32)))


def test_size_thresholds(monkeypatch):
    """Small inputs stay in XLA (fused with their neighbours); large ones take the kernels."""
    if not loader.load("norm").loaded:
        pytest.skip("the native batch norm library is unavailable here")
    monkeypatch.setattr(norm_lowering, "MIN_ELEMENTS", 1 << 16)  # (the default)
    layer = nn.batch_norm()
    for shape, want in (((4, 16), False), ((4096, 16), True), ((4095, 16), False)):
        _, p, s = layer.init(jax.random.key(0), shape)
        text = _hlo(lambda x: layer.apply(p, s, x, train=True), jnp.ones(shape, jnp.float32))
        assert bool(_calls(text)) == want, shape


@pytest.mark.torch
def test_matches_torch_batchnorm_relu(native):
    """Train mode against ``torch.nn.BatchNorm2d`` + ``ReLU``: output, running statistics,
    gradients of input, weight and bias."""
    torch = pytest.importorskip("torch")
    x, ct = _data((8, 6, 6, 24), 17, loc=3.0)
    layer = nn.batch_norm(decay=0.9, relu=True)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    params = {"scale": jnp.linspace(0.5, 1.5, 24, dtype=jnp.float32),
              "offset": jnp.linspace(-0.5, 0.5, 24, dtype=jnp.float32)}
    with config.override(norm_backend="native"):
        y, s, (gp, gx) = jax.jit(lambda p, st_, xx, c: _layer_step(layer, p, st_, xx, c))(
            params, state, x, ct)
    bn = torch.nn.BatchNorm2d(24, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(np.asarray(params["scale"])))
        bn.bias.copy_(torch.tensor(np.asarray(params["offset"])))
    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    ty = torch.relu(bn(tx))
    ty.backward(torch.tensor(np.asarray(ct)).permute(0, 3, 1, 2))
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()  # noqa: E731
    _close(y, nhwc(ty), tol=2e-5)
    _close((s["mean"], s["var"]), (bn.running_mean.numpy(), bn.running_var.numpy()), tol=2e-5)
    _close((gx, gp["scale"], gp["offset"]),
           (nhwc(tx.grad), bn.weight.grad.numpy(), bn.bias.grad.numpy()), tol=5e-5)


def test_refusals():
    with pytest.raises(ValueError, match="relu must be True or False"):
        nn.batch_norm(relu=1)
    with pytest.raises(ValueError, match="norm_backend"):
        config.update("norm_backend", "fast")
    layer = nn.batch_norm()
    _, params, state = layer.init(jax.random.key(0), (1, 4))
    with pytest.raises(nn.ShapeError, match="more than 1 value per channel"):
        layer.apply(params, state, jnp.ones((1, 4), jnp.float32), train=True)
