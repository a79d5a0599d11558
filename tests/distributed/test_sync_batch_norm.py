"""SyncBatchNorm: under shard_map over 8 devices holding different numbers of real examples,
the output, new state and gradients equal batch_norm on all real examples on one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fdl import nn, parallel
from fdl.nn.core import ShapeError
from fdl.parallel import sync_batch_norm, sync_moments

N_DEV, ROWS, C = 8, 4, 3
REAL = np.array([4, 3, 1, 0, 4, 2, 1, 4])  # real rows per device (device 3 has none)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < N_DEV:
        pytest.skip("needs 8 (simulated) devices")
    return parallel.data_mesh(N_DEV)


def _data(dtype=np.float32, spatial=()):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N_DEV * ROWS, *spatial, C)) * 2 + 3).astype(dtype)
    mask = np.zeros(N_DEV * ROWS, dtype)
    for d, r in enumerate(REAL):
        mask[d * ROWS: d * ROWS + r] = 1
    return x, mask


def _init(layer, shape):
    _, params, state = layer.init(jax.random.key(0), shape)
    params = {"scale": params["scale"] + jnp.arange(C) * 0.1, "offset": params["offset"] - 0.2}
    return params, state


def _loss_sharded(mesh, layer):
    """loss(params, x, mask) = sum over real rows of (y * weights)**2 under shard_map, and the
    new state."""
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                       out_specs=(P(), P()))
    def run(params, state, x, mask):
        y, new_state = layer.apply(params, state, x, train=True, mask=mask)
        w = jnp.arange(1, y.size + 1, dtype=y.dtype).reshape(y.shape)
        m = mask.reshape(mask.shape + (1,) * (y.ndim - 1))
        return jax.lax.psum(jnp.sum(m * (y * w / y.size) ** 2), "data"), new_state

    return run


def _reference(params, state, x_real, w_real):
    """The same loss with plain batch_norm on the real rows only, on one device."""
    y, new_state = nn.batch_norm().apply(params, state, x_real, train=True)
    return jnp.sum((y * w_real) ** 2), new_state


@pytest.mark.parametrize("spatial", [(), (2, 2)])
def test_unequal_real_rows_per_device_equal_one_device(mesh, spatial):
    x, mask = _data(spatial=spatial)
    layer = sync_batch_norm("data")
    params, state = _init(layer, x.shape)
    run = _loss_sharded(mesh, layer)
    (loss, new_state), grads = jax.jit(jax.value_and_grad(
        lambda p, xx: run(p, state, xx, mask), argnums=(0, 1), has_aux=True))(params, x)

    real = mask.astype(bool)
    # the weights each device applies to its (ROWS, ...) block, laid end to end
    per_dev = np.arange(1, x[0].size * ROWS + 1, dtype=np.float32).reshape((ROWS, *x.shape[1:]))
    weights = np.concatenate([per_dev / per_dev.size] * N_DEV)
    (ref_loss, ref_state), ref_grads = jax.value_and_grad(
        lambda p, xr: _reference(p, state, xr, weights[real]), argnums=(0, 1),
        has_aux=True)(params, x[real])
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(new_state[k], ref_state[k], rtol=2e-5, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[0][k], ref_grads[0][k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1][real], ref_grads[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(grads[1][~real], 0)  # padding does not reach the loss


def test_equal_counts_match_batch_norm_axis_name_and_the_global_batch(mesh):
    x, _ = _data()
    params, state = _init(nn.batch_norm(), x.shape)
    outs = []
    for layer in (sync_batch_norm("data"), nn.batch_norm(axis_name="data")):
        f = jax.jit(jax.shard_map(lambda p, s, xx, layer=layer: layer.apply(p, s, xx, train=True),
                          mesh=mesh, in_specs=(P(), P(), P("data")),
                          out_specs=(P("data"), P())))
        outs.append(f(params, state, x))
    outs.append(nn.batch_norm().apply(params, state, x, train=True))
    for y, s in outs[1:]:
        np.testing.assert_allclose(outs[0][0], y, rtol=1e-5, atol=1e-5)
        for k in ("mean", "var"):
            np.testing.assert_allclose(outs[0][1][k], s[k], rtol=1e-5, atol=1e-6)


def test_without_axis_masked_statistics_and_eval_mode():
    x, mask = _data()
    layer = sync_batch_norm()
    params, state = _init(layer, x.shape)
    y, s = layer.apply(params, state, x, train=True, mask=mask)
    ref_y, ref_s = nn.batch_norm().apply(params, state, x[mask > 0], train=True)
    np.testing.assert_allclose(y[mask > 0], ref_y, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s[k], ref_s[k], rtol=1e-5, atol=1e-6)
    y_eval, s_eval = layer.apply(params, s, x, train=False)
    ref_eval, _ = nn.batch_norm().apply(params, s, x, train=False)
    np.testing.assert_array_equal(y_eval, ref_eval)
    assert s_eval is s


def test_moments_gradients_float64(mesh):
    """Finite differences of the combined moments through the psums (float64)."""
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        x, mask = _data(np.float64)

        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                           out_specs=P())
        def moments(xx, mm):
            mean, var, _ = sync_moments(xx, axis_name="data", mask=mm)
            return jnp.concatenate([mean, var])

        check_grads(lambda xx: moments(xx, mask), (x,), order=1, modes=("rev", "fwd"),
                    atol=1e-6, rtol=1e-6)
        mean, var, n = sync_moments(x[mask > 0])
        np.testing.assert_allclose(moments(x, mask), np.concatenate([mean, var]), rtol=1e-12)


def test_bad_mask_shape_names_the_layer():
    x, _ = _data()
    layer = sync_batch_norm()
    params, state = _init(layer, x.shape)
    with pytest.raises(ShapeError, match="sync_batch_norm.*mask of shape"):
        layer.apply(params, state, x, train=True, mask=np.ones(5))
