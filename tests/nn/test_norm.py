"""batch_norm and layer_norm: shapes, gradients, running averages, PyTorch equality,
cross-device statistics, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdl import nn
from fdl.testing import arrays, check_gradients


def _key(seed=0):
    return jax.random.key(seed)


def _rand(shape, seed=0, dtype=np.float32, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).normal(loc, scale, size=shape)).astype(dtype)


# ----------------------------------------------------------------------------- shapes


@settings(max_examples=8)
@given(shape=st.lists(st.integers(2, 4), min_size=2, max_size=4).map(tuple),
       train=st.booleans())
def test_shape_agreement(shape, train):
    for layer in (nn.batch_norm(), nn.layer_norm()):
        out_shape, params, state = layer.init(_key(), shape)
        x = jnp.asarray(_rand(shape))
        y, new_state = layer.apply(params, state, x, train=train)
        assert y.shape == out_shape == shape
        assert y.dtype == x.dtype
        assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_params_and_state_layout():
    _, params, state = nn.batch_norm().init(_key(), (8, 5, 5, 3))
    assert set(params) == {"scale", "offset"} and set(state) == {"mean", "var"}
    for a in (*params.values(), *state.values()):
        assert a.shape == (3,) and a.dtype == jnp.float32
    np.testing.assert_array_equal(state["var"], np.ones(3))
    _, params, state = nn.batch_norm(use_scale=False, use_offset=False).init(_key(), (8, 3))
    assert params == {} and set(state) == {"mean", "var"}
    _, params, state = nn.layer_norm().init(_key(), (2, 7, 4))
    assert {k: v.shape for k, v in params.items()} == {"scale": (4,), "offset": (4,)}
    assert state == {}


# ----------------------------------------------------------------------------- gradients


def _bn_args(x, seed):
    c = x.shape[-1]
    rng = np.random.default_rng(seed)
    params = {"scale": rng.uniform(0.5, 1.5, c), "offset": rng.normal(size=c)}
    state = {"mean": rng.normal(size=c), "var": rng.uniform(0.5, 2.0, c)}
    return params, state


bn_inputs = st.sampled_from([(4, 2), (2, 2, 2, 2)]).flatmap(
    lambda s: arrays(s, min_value=-2.0, max_value=2.0))


def _spread(x):
    """Add a fixed non-constant pattern so that no channel is (nearly) constant."""
    return x + 1.5 * np.sin(np.arange(x.size) * 1.3).reshape(x.shape)


@settings(max_examples=4)
@given(x=bn_inputs, train=st.booleans())
def test_batch_norm_gradients(x, train):
    """Order-2 float64 gradient check wrt params and input, train and eval mode."""
    x = _spread(x)
    assume(np.var(x.reshape(-1, x.shape[-1]), axis=0).min() > 0.05)
    layer = nn.batch_norm()
    params, state = _bn_args(x, 1)

    def f(p, xx):
        return layer.apply(p, state, xx, train=train)[0]

    check_gradients(f, (params, x), order=2, atol=1e-4, rtol=1e-4)


@settings(max_examples=4)
@given(x=arrays((2, 2, 3), min_value=-2.0, max_value=2.0))
def test_layer_norm_gradients(x):
    x = _spread(x)
    assume(np.var(x, axis=-1).min() > 0.05)
    layer = nn.layer_norm()
    c = x.shape[-1]
    params = {"scale": np.linspace(0.5, 1.5, c), "offset": np.linspace(-1, 1, c)}
    check_gradients(lambda p, xx: layer.apply(p, {}, xx)[0], (params, x), order=2,
                    atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- semantics


def test_train_normalises_with_batch_stats_and_eval_with_running():
    layer = nn.batch_norm(decay=0.8)
    x = jnp.asarray(_rand((16, 3, 3, 4), loc=2.0, scale=3.0))
    _, params, state = layer.init(_key(), x.shape)
    y, new_state = layer.apply(params, state, x, train=True)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)  # biased var normalised
    # eval uses the running statistics (initial 0 / 1): y = x / sqrt(1 + eps)
    y_eval, s_eval = layer.apply(params, state, x, train=False)
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert s_eval is state
    # eval with the updated state uses those statistics
    y_eval2, _ = layer.apply(params, new_state, x, train=False)
    ref = (x - new_state["mean"]) / np.sqrt(new_state["var"] + 1e-5)
    np.testing.assert_allclose(y_eval2, ref, rtol=1e-5, atol=1e-5)


def test_running_averages_exact_after_k_steps():
    decay, k = 0.7, 5
    layer = nn.batch_norm(decay=decay)
    _, params, state = layer.init(_key(), (6, 3))
    step = jax.jit(lambda s, x: layer.apply(params, s, x, train=True)[1])
    run_mean, run_var = np.zeros(3), np.ones(3)
    for i in range(k):
        x = _rand((6, 3), seed=i, dtype=np.float64, loc=i, scale=1 + i)
        state = step(state, jnp.asarray(x, jnp.float32))
        run_mean = decay * run_mean + (1 - decay) * x.mean(0)
        run_var = decay * run_var + (1 - decay) * x.var(0, ddof=1)
    np.testing.assert_allclose(state["mean"], run_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["var"], run_var, rtol=1e-5)
    assert state["mean"].dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_float32_statistics(dtype):
    layer = nn.batch_norm()
    x32 = jnp.asarray(_rand((32, 4, 4, 3), loc=3.0))
    x = x32.astype(dtype)
    _, params, state = layer.init(_key(), x.shape)
    y, new_state = layer.apply(params, state, x, train=True)
    assert y.dtype == dtype
    assert new_state["mean"].dtype == new_state["var"].dtype == jnp.float32
    y_ref, s_ref = layer.apply(params, state, x.astype(jnp.float32), train=True)
    np.testing.assert_allclose(new_state["mean"], s_ref["mean"], rtol=1e-6)
    np.testing.assert_allclose(new_state["var"], s_ref["var"], rtol=1e-5)
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=0.05)
    y_ln = nn.layer_norm().apply(nn.layer_norm().init(_key(), x.shape)[1], {}, x)[0]
    assert y_ln.dtype == dtype


def test_jit_grad_with_state_as_aux():
    layer = nn.serial(nn.dense(4), nn.batch_norm())
    x = jnp.asarray(_rand((8, 3)))
    _, params, state = layer.init(_key(), x.shape)

    @jax.jit
    def step(params, state, x):
        def loss(p):
            y, s = layer.apply(p, state, x, train=True)
            return jnp.sum(y ** 2), s
        return jax.grad(loss, has_aux=True)(params)

    grads, new_state = step(params, state, x)
    assert set(new_state["1"]) == {"mean", "var"}
    assert grads["1"]["scale"].shape == (4,)


# ----------------------------------------------------------------------------- PyTorch


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(16, 5), (8, 6, 6, 3)])
def test_batch_norm_matches_torch(shape):
    torch = pytest.importorskip("torch")
    decay, eps, steps = 0.75, 1e-3, 4
    c = shape[-1]
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    offset = rng.normal(size=c).astype(np.float32)
    tbn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        c, eps=eps, momentum=1 - decay)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(scale))
        tbn.bias.copy_(torch.from_numpy(offset))
    layer = nn.batch_norm(decay=decay, eps=eps)
    _, _, state = layer.init(_key(), shape)
    params = {"scale": jnp.asarray(scale), "offset": jnp.asarray(offset)}
    apply = jax.jit(layer.apply, static_argnames="train")

    def to_torch(x):  # NHWC -> NCHW
        return torch.from_numpy(np.moveaxis(x, -1, 1).copy()) if x.ndim == 4 else \
            torch.from_numpy(x)

    def from_torch(t):
        a = t.detach().numpy()
        return np.moveaxis(a, 1, -1) if a.ndim == 4 else a

    tbn.train()
    for i in range(steps):
        x = _rand(shape, seed=10 + i, loc=i - 1.0, scale=1.0 + 0.5 * i)
        y, state = apply(params, state, jnp.asarray(x), train=True)
        ty = tbn(to_torch(x))
        np.testing.assert_allclose(y, from_torch(ty), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    tbn.eval()
    x = _rand(shape, seed=99, loc=0.5)
    y, _ = apply(params, state, jnp.asarray(x), train=False)
    np.testing.assert_allclose(y, from_torch(tbn(to_torch(x))), rtol=1e-4, atol=1e-5)


@pytest.mark.torch
def test_layer_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x = _rand((3, 5, 6), loc=1.0, scale=2.0)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    offset = rng.normal(size=6).astype(np.float32)
    tln = torch.nn.LayerNorm(6, eps=1e-4)
    with torch.no_grad():
        tln.weight.copy_(torch.from_numpy(scale))
        tln.bias.copy_(torch.from_numpy(offset))
    y, _ = nn.layer_norm(eps=1e-4).apply(
        {"scale": jnp.asarray(scale), "offset": jnp.asarray(offset)}, {}, jnp.asarray(x))
    np.testing.assert_allclose(y, tln(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------- cross-device


def _global_reference(layer, params, state, x):
    return layer.apply(params, state, x, train=True)


def test_batch_norm_axis_name_shard_map_equals_global_batch():
    ndev = 4
    mesh = jax.make_mesh((ndev,), ("batch",), devices=jax.devices()[:ndev],
                         axis_types=(jax.sharding.AxisType.Explicit,))
    x = jnp.asarray(_rand((ndev * 3, 2, 2, 5), loc=1.0, scale=2.0))
    # make the shards' statistics differ, so per-device statistics would be wrong
    x = x * jnp.repeat(jnp.arange(1.0, ndev + 1), 3)[:, None, None, None]
    layer = nn.batch_norm(decay=0.6, axis_name="batch")
    _, params, state = layer.init(_key(), x.shape)
    y_ref, s_ref = _global_reference(nn.batch_norm(decay=0.6), params, state, x)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("batch")),
                       out_specs=(P("batch"), P()))
    def sharded(params, state, xs):
        return layer.apply(params, state, xs, train=True)

    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    y, s = jax.jit(sharded)(params, state, xs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["mean"], s_ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["var"], s_ref["var"], rtol=1e-5)


def test_batch_norm_axis_name_pmap_equals_global_batch():
    ndev = 2
    x = jnp.asarray(_rand((ndev * 4, 3), loc=1.0))
    x = x.at[:4].multiply(3.0)
    layer = nn.batch_norm(axis_name="i")
    _, params, state = layer.init(_key(), x.shape)
    y_ref, s_ref = _global_reference(nn.batch_norm(), params, state, x)
    f = jax.pmap(lambda xs: layer.apply(params, state, xs, train=True), axis_name="i",
                 devices=jax.devices()[:ndev])
    y, s = f(x.reshape(ndev, 4, 3))
    np.testing.assert_allclose(y.reshape(x.shape), y_ref, rtol=1e-5, atol=1e-5)
    for d in range(ndev):
        np.testing.assert_allclose(s["mean"][d], s_ref["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["var"][d], s_ref["var"], rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("eps", [0.0, -1e-5, "1e-5", None])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a real number > 0"):
        nn.batch_norm(eps=eps)
    with pytest.raises(ValueError, match="eps must be a real number > 0"):
        nn.layer_norm(eps=eps)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, True])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match=r"0 <= decay < 1.*PyTorch momentum = 1 - decay"):
        nn.batch_norm(decay=decay)


def test_bad_shapes():
    layer = nn.batch_norm()
    with pytest.raises(nn.ShapeError, match=r"rank >= 2.*got shape \(5,\)"):
        layer.init(_key(), (5,))
    _, params, state = layer.init(_key(), (4, 3))
    with pytest.raises(nn.ShapeError, match=r"\(N, \.\.\., 3\), got shape \(4, 2\)"):
        layer.apply(params, state, jnp.ones((4, 2)), train=True)
    with pytest.raises(nn.ShapeError, match="rank >= 2"):
        layer.apply(params, state, jnp.ones((3,)))
    with pytest.raises(nn.ShapeError, match="more than 1 value per channel"):
        layer.apply(params, state, jnp.ones((1, 3)), train=True)
    # the path of a nested layer is named
    net = nn.serial(("fc", nn.dense(4)), ("bn", nn.batch_norm()))
    _, p, s = net.init(_key(), (2, 3))
    p["bn"] = {"scale": jnp.ones(5), "offset": jnp.zeros(5)}
    s["bn"] = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
    with pytest.raises(nn.ShapeError, match=r"layer 'bn' \(batch_norm\)"):
        net.apply(p, s, jnp.ones((2, 3)))
    ln = nn.layer_norm()
    _, lp, _ = ln.init(_key(), (2, 4))
    with pytest.raises(nn.ShapeError, match=r"expected input \(\.\.\., 4\), got shape \(2, 3\)"):
        ln.apply(lp, {}, jnp.ones((2, 3)))


def test_batch_norm_float32_gradients_survive_a_large_mean():
    """Channels whose |mean| is 100x their std: the float32 train-mode gradients stay within
    1e-5 of float64 (the one-pass variance E[x^2] - E[x]^2 was 6e-4 off here; PyTorch 8e-7)."""
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 1.0, size=(32, 8, 8, 4))
    cot = rng.normal(size=x.shape)
    layer = nn.batch_norm()
    _, params, state = layer.init(jax.random.key(0), x.shape)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 4)),
              "offset": jnp.asarray(rng.normal(size=4))}

    def grads(dtype):
        def f(p, x):
            y, _ = layer.apply(p, state, x, train=True)
            return jnp.sum(y * jnp.asarray(cot, dtype))
        cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1)))(cast(params), jnp.asarray(x, dtype))

    (gp32, gx32), (gp64, gx64) = grads(jnp.float32), grads(jnp.float64)
    rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(gx32, gx64) < 1e-5
    assert rel(gp32["scale"], gp64["scale"]) < 1e-4
