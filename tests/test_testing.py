"""fdl.testing itself: the gradient checker passes correct derivatives and catches wrong
ones (custom_vjp / custom_jvp / second order / one coordinate); the strategies keep their
promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import fdl.testing as ft
from fdl.nn import Layer

X = np.linspace(-1.3, 1.7, 6).reshape(2, 3)


def _sin_with_vjp(scale, only_first=False):
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def fwd(x):
        return jnp.sin(x), x

    def bwd(x, g):
        true = jnp.cos(x) * g
        if only_first:
            wrong = true.reshape(-1).at[0].multiply(scale).reshape(true.shape)
        else:
            wrong = scale * true
        return (wrong,)

    f.defvjp(fwd, bwd)
    return f


def test_passes_correct_gradients():
    ft.check_gradients(jnp.tanh, (X,), order=2)
    ft.check_gradients(lambda a, b: jnp.sum(a * jnp.sin(b)), (X, X + 1), order=2)
    ft.check_gradients(_sin_with_vjp(1.0), (X,), order=1, modes=("rev",))


def test_catches_wrong_custom_vjp():
    with pytest.raises(AssertionError):
        ft.check_gradients(_sin_with_vjp(1.01), (X,), order=1, modes=("rev",))


def test_catches_wrong_gradient_in_one_coordinate():
    with pytest.raises(AssertionError):
        ft.check_gradients(_sin_with_vjp(1.05, only_first=True), (X,), order=1, modes=("rev",))


def test_catches_wrong_custom_jvp():
    @jax.custom_jvp
    def f(x):
        return x**3

    f.defjvp(lambda p, t: (p[0] ** 3, 3.0 * p[0] ** 2 * t[0] + 0.01 * t[0]))
    with pytest.raises(AssertionError):
        ft.check_gradients(f, (X,), order=1)


def test_order2_catches_wrong_second_derivative():
    """First derivative right, its own derivative wrong (stop_gradient): order 1 passes,
    order 2 fails."""

    @jax.custom_jvp
    def f(x):
        return x**3

    f.defjvp(lambda p, t: (p[0] ** 3, 3.0 * jax.lax.stop_gradient(p[0]) ** 2 * t[0]))
    ft.check_gradients(f, (X,), order=1)
    with pytest.raises(AssertionError):
        ft.check_gradients(f, (X,), order=2)


def _layer_with_grad_scale(scale):
    """A dense-like layer y = sin(x) * w whose gradient wrt x is scaled by ``scale``."""
    sin = _sin_with_vjp(scale)

    def init(key, in_shape):
        return tuple(in_shape), {"w": jnp.full(in_shape[-1:], 0.7)}, {}

    def apply(params, state, x, *, key=None, train=False):
        return sin(x) * params["w"], state

    return Layer(init, apply, name="test_layer")


def test_check_layer_gradients():
    ft.check_layer_gradients(_layer_with_grad_scale(1.0), X, key=jax.random.key(0),
                             modes=("rev",))
    bad = _layer_with_grad_scale(0.9)
    with pytest.raises(AssertionError):
        ft.check_layer_gradients(bad, X, key=jax.random.key(1), modes=("rev",))
    with pytest.raises(AssertionError):
        ft.check_layer_gradients(bad, X, key=jax.random.key(2), modes=("rev",), wrt=("x",))
    # the wrong gradient is wrt x only: the params-only check passes
    ft.check_layer_gradients(bad, X, key=jax.random.key(3), modes=("rev",), wrt=("params",))


def test_finite_difference_grad():
    g = ft.finite_difference_grad(lambda v: jnp.sum(v**2 * 3.0), X)
    np.testing.assert_allclose(g, 6.0 * X, rtol=1e-6)


def test_requires_x64():
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError, match="gradient checks need float64"):
            ft.check_gradients(jnp.tanh, (np.ones(2, np.float32),))


@settings(max_examples=30)
@given(a=ft.arrays(ft.shapes(1, 3, max_side=4), min_value=-1.0, max_value=1.0,
                   kinks=(0.0, 0.5), margin=0.1))
def test_arrays_strategy_bounds_and_kinks(a):
    assert a.dtype == np.float64 and 1 <= a.ndim <= 3 and max(a.shape) <= 4
    # values stay in range (a value pushed off a kink may move by at most the margin)
    assert np.all(a >= -1.0 - 0.1) and np.all(a <= 1.0 + 0.1)
    assert np.all(np.abs(a - 0.0) >= 0.1 - 1e-12) and np.all(np.abs(a - 0.5) >= 0.1 - 1e-12)


def test_count_compilations_sees_recompiles_of_that_function_only():
    @jax.jit
    def step(x):
        return x * 2

    other = jax.jit(lambda x: x + 1)
    with ft.count_compilations(step) as compiled:
        step(jnp.ones(3))
        step(jnp.ones(3))
        other(jnp.ones(5))
    assert compiled == ["jit(step)"]
    with ft.count_compilations("step") as compiled:
        step(jnp.ones(3))
        step(jnp.ones(4))  # a new shape compiles again
    assert compiled == ["jit(step)"]
    with ft.count_compilations() as everything:
        other(jnp.ones(6))
    assert "jit(<lambda>)" in everything
