"""The native convolution under JAX's transformations: forward mode (jvp, jacfwd) and
Hessian-vector products against float64 XLA and finite differences. (Per-platform lowering:
tests/test_export_platforms.py; sharded jit: tests/parallel/test_data_parallel.py.)"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fdl import config
from fdl._ext import loader
from fdl.nn.conv_lowering import conv2d_nhwc

ARGS = ((2, 1), ((1, 0), (2, 1)), (1, 1), 1)


@pytest.fixture
def native():
    if not loader.load("conv").loaded:
        pytest.skip(f"native convolution unavailable: {loader.status('conv').reason}")
    with config.override(conv_backend="native"):
        yield


def _ref64(x, w):
    return lax.conv_general_dilated(x.astype(jnp.float64), w.astype(jnp.float64), *ARGS[:2],
                                    rhs_dilation=ARGS[2],
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _data():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 7, 6, 4), jnp.float32)
    w = jax.random.normal(k[1], (3, 2, 4, 5), jnp.float32)
    return x, w, jax.random.normal(k[2], x.shape, jnp.float32), jax.random.normal(k[3], w.shape,
                                                                                  jnp.float32)


def _conv(x, w):
    return conv2d_nhwc(x, w, *ARGS)


def _close(a, b, tol=2e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def test_forward_mode_and_hvp_match_float64_and_finite_differences(native):
    x, w, tx, tw = _data()
    f = jax.jit(lambda x, w, tx, tw: jax.jvp(_conv, (x, w), (tx, tw)))
    assert "fdl_conv_fwd" in f.lower(x, w, tx, tw).as_text()
    y, ty = f(x, w, tx, tw)
    with jax.enable_x64():
        y64, ty64 = jax.jvp(_ref64, (x, w), (tx, tw))
    _close(y, y64)
    _close(ty, ty64)
    # central finite differences of the native function itself (float32: loose)
    eps = 1e-2
    fd = (_conv(x + eps * tx, w + eps * tw) - _conv(x - eps * tx, w - eps * tw)) / (2 * eps)
    _close(ty, fd, tol=1e-2)
    # jacfwd (a vmapped jvp) and a Hessian-vector product (jvp of grad, second order)
    jac = jax.jit(jax.jacfwd(lambda w: _conv(x[:1, :4, :4], w)))(w)
    with jax.enable_x64():
        jac64 = jax.jacfwd(lambda w: _ref64(x[:1, :4, :4], w))(w.astype(jnp.float64))
    _close(jac, jac64)

    def loss(c):
        return lambda x, w: jnp.sum(jnp.tanh(c(x, w)))

    hvp = jax.jit(lambda x, w: jax.jvp(jax.grad(loss(_conv), (0, 1)), (x, w), (tx, tw))[1])
    with jax.enable_x64():
        want = jax.jvp(jax.grad(loss(_ref64), (0, 1)), (x.astype(jnp.float64),
                                                        w.astype(jnp.float64)),
                       (tx.astype(jnp.float64), tw.astype(jnp.float64)))[1]
    for a, b in zip(hvp(x, w), want):
        _close(a, b, tol=5e-4)
