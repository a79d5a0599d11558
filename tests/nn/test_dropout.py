"""dropout: identity in eval, inverted scaling in training, keys, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdl import nn
from fdl.testing import arrays, check_gradients


def _key(seed=0):
    return jax.random.key(seed)


@settings(max_examples=8)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
       rate=st.sampled_from([0.0, 0.3, 0.9]), train=st.booleans())
def test_shape_agreement(shape, rate, train):
    layer = nn.dropout(rate)
    out_shape, params, state = layer.init(_key(), shape)
    x = jnp.ones(shape, jnp.float32)
    y, s = layer.apply(params, state, x, key=jax.random.key(1), train=train)
    assert y.shape == out_shape == shape and y.dtype == x.dtype
    assert params == {} and s == {}


def test_eval_and_rate_zero_are_identity():
    x = jax.random.normal(_key(), (7, 5))
    y, _ = nn.dropout(0.5).apply({}, {}, x)
    assert y is x
    y, _ = nn.dropout(0.5).apply({}, {}, x, key=jax.random.key(3), train=False)
    assert y is x
    y, _ = nn.dropout(0.0).apply({}, {}, x, key=jax.random.key(3), train=True)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_train_scaling_statistics(rate):
    n = 200_000
    x = jnp.ones((n,), jnp.float32)
    y, _ = nn.dropout(rate).apply({}, {}, x, key=jax.random.key(42), train=True)
    y = np.asarray(y)
    zero = y == 0
    # survivors are scaled by exactly 1 / (1 - rate)
    np.testing.assert_allclose(y[~zero], 1.0 / (1.0 - rate), rtol=1e-6)
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(zero.mean() - rate) < 5 * sigma
    # the mean is preserved (inverted dropout)
    assert abs(y.mean() - 1.0) < 5 * sigma / (1 - rate)


@pytest.mark.torch
def test_scaling_matches_torch_statistically():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    rate, n = 0.3, 100_000
    t = torch.nn.functional.dropout(torch.ones(n), p=rate, training=True).numpy()
    y = np.asarray(nn.dropout(rate).apply({}, {}, jnp.ones(n, jnp.float32),
                                          key=jax.random.key(1), train=True)[0])
    assert set(np.unique(t)) == set(np.unique(y))  # same kept value 1/(1-p) and 0
    assert abs((t == 0).mean() - (y == 0).mean()) < 6 * np.sqrt(rate * (1 - rate) / n)


def test_determinism_per_key():
    layer = nn.dropout(0.5)
    x = jnp.ones((64, 8), jnp.float32)
    f = jax.jit(lambda k: layer.apply({}, {}, x, key=k, train=True)[0])
    a = f(jax.random.key(7))
    b = f(jax.random.key(7))
    c = f(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_low_precision_dtype_preserved():
    x = jnp.ones((1000,), jnp.bfloat16)
    y, _ = nn.dropout(0.5).apply({}, {}, x, key=_key(), train=True)
    assert y.dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(y, np.float32))) <= {0.0, 2.0}


@settings(max_examples=4)
@given(x=arrays((3, 4)))
def test_gradients(x):
    """For a fixed key dropout is linear: d y / d x = mask / (1 - rate)."""
    kd = jax.random.key_data(jax.random.key(5))
    layer = nn.dropout(0.4)

    def f(xx):
        return layer.apply({}, {}, xx, key=jax.random.wrap_key_data(kd), train=True)[0]

    check_gradients(f, (x,), order=2)
    g = jax.grad(lambda xx: jnp.sum(f(xx)))(jnp.asarray(x))
    y = f(jnp.ones_like(jnp.asarray(x)))
    np.testing.assert_allclose(g, y, rtol=1e-12)


def test_missing_key():
    with pytest.raises(ValueError, match=r"dropout: train=True needs a PRNG key"):
        nn.dropout(0.5).apply({}, {}, jnp.ones(3), train=True)
    net = nn.serial(nn.dense(3), nn.dropout(0.5))
    _, p, s = net.init(_key(), (2, 4))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        net.apply(p, s, jnp.ones((2, 4)), train=True)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.5", None])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match=r"dropout: rate must satisfy 0 <= rate < 1"):
        nn.dropout(rate)
