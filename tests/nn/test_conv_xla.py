"""fdl.nn.conv_xla: lax's convolution whose derivatives are canonical convolutions.

Values and derivatives (reverse, forward, second order, vmap) equal lax.conv_general_dilated's,
and inside a loop body every convolution of a training step compiles to the canonical layout
that XLA's CPU backend runs as an Eigen call (lax's own transpose rules do not)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from fdl.nn.conv_xla import conv_general


def _lax(x, w, stride, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1), groups=1):
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)


GEOMS = st.tuples(
    st.tuples(st.integers(1, 2), st.integers(1, 2)),                     # stride
    st.tuples(st.tuples(st.integers(0, 2), st.integers(-1, 2)),
              st.tuples(st.integers(0, 2), st.integers(0, 2))),          # padding
    st.tuples(st.integers(1, 2), st.integers(1, 2)),                     # lhs dilation
    st.tuples(st.integers(1, 2), st.integers(1, 2)),                     # rhs dilation
    st.sampled_from([1, 2]),                                             # groups
)


@settings(max_examples=4)
@given(geom=GEOMS, seed=st.integers(0, 2**16))
def test_values_and_gradients_equal_lax(geom, seed):
    stride, padding, lhs_dil, rhs_dil, groups = geom
    rng = np.random.default_rng(seed)
    args = (stride, padding, lhs_dil, rhs_dil, groups)

    @jax.jit
    def both(x, w, ct):
        def vjp(conv):
            y, back = jax.vjp(lambda x, w: conv(x, w, *args), x, w)
            return y, back(ct)

        return vjp(conv_general), vjp(_lax)

    with jax.enable_x64(True):
        x = rng.standard_normal((2, 7, 6, 4))
        w = rng.standard_normal((3, 2, 4 // groups, 6))
        ct = rng.standard_normal(jax.eval_shape(lambda x, w: _lax(x, w, *args), x, w).shape)
        (y, got), (y_lax, want) = both(x, w, ct)
        np.testing.assert_array_equal(y, y_lax)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_finite_differences_orders_1_and_2_both_modes():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, w = rng.standard_normal((1, 4, 5, 2)), rng.standard_normal((3, 3, 2, 2))
        f = lambda x, w: jnp.sin(conv_general(x, w, (2, 1), ((1, 0), (1, 2))))  # noqa: E731
        check_grads(f, (x, w), order=2, modes=("fwd", "rev"))


def test_jvp_and_vmap_equal_lax():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x, w = rng.standard_normal((3, 2, 5, 5, 2)), rng.standard_normal((3, 3, 2, 2))
        args = ((1, 1), ((1, 1), (1, 1)))
        f = lambda x, w: jnp.sum(jnp.tanh(conv_general(x, w, *args)))  # noqa: E731
        g = lambda x, w: jnp.sum(jnp.tanh(_lax(x, w, *args)))  # noqa: E731
        np.testing.assert_allclose(jax.jvp(f, (x[0], w), (x[1], w))[1],
                                   jax.jvp(g, (x[0], w), (x[1], w))[1], rtol=1e-12)
        np.testing.assert_allclose(jax.vmap(f, (0, None))(x, w), jax.vmap(g, (0, None))(x, w),
                                   rtol=1e-12)


def _conv_dim_labels(hlo: str) -> list[str]:
    return re.findall(r"convolution\([^)]*\).*?dim_labels=([^,\s]+)", hlo)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU layout check")
def test_gradient_convolutions_in_a_loop_body_are_canonical():
    """A training loop (``fori_loop`` over grad steps) compiles every convolution to NHWC/HWIO:
    the form XLA's CPU backend runs with Eigen. Plain lax leaves the backward ones
    non-canonical inside the loop body (checked too, so the test notices if XLA changes)."""
    x = jnp.ones((4, 8, 8, 3), jnp.float32)
    w = (jnp.ones((3, 3, 3, 8), jnp.float32), jnp.ones((3, 3, 8, 8), jnp.float32))

    def loop(conv):
        def loss(w, x):
            h = jax.nn.relu(conv(x, w[0], (1, 1), ((1, 1), (1, 1))))
            return jnp.sum(conv(h, w[1], (2, 2), ((1, 1), (1, 1))) ** 2)

        def body(_, w):
            g = jax.grad(loss)(w, x)
            return jax.tree.map(lambda a, b: a - 1e-3 * b, w, g)

        return jax.jit(lambda w, n: lax.fori_loop(0, n, body, w)).lower(w, 3).compile()

    labels = _conv_dim_labels(loop(conv_general).as_text())
    assert len(labels) == 5 and set(labels) == {"b01f_01io->b01f"}, labels
    plain = _conv_dim_labels(loop(_lax).as_text())
    assert len(plain) == 5 and set(plain) != {"b01f_01io->b01f"}, plain
