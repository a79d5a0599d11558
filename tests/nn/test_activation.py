"""Activations as functions and layers: values against PyTorch / closed forms, order-2
gradient checks away from kinks, PReLU's learnable slope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.nn.functional as F
import fdl.testing as ft
from fdl import nn

torch = pytest.importorskip("torch")
TF = torch.nn.functional

SHAPE = (3, 4)

# (name, fdl function, torch reference, kinks)
CASES = [
    ("relu", F.relu, TF.relu, (0.0,)),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.1), lambda t: TF.leaky_relu(t, 0.1), (0.0,)),
    ("leaky_relu_default", F.leaky_relu, TF.leaky_relu, (0.0,)),  # both default to 0.01
    ("elu", lambda x: F.elu(x, 0.7), lambda t: TF.elu(t, 0.7), (0.0,)),
    ("selu", F.selu, TF.selu, (0.0,)),
    ("gelu", F.gelu, TF.gelu, ()),
    ("gelu_tanh", lambda x: F.gelu(x, approximate=True),
     lambda t: TF.gelu(t, approximate="tanh"), ()),
    ("sigmoid", F.sigmoid, torch.sigmoid, ()),
    ("tanh", F.tanh, torch.tanh, ()),
    ("softmax", F.softmax, lambda t: TF.softmax(t, -1), ()),
    ("softmax_axis0", lambda x: F.softmax(x, axis=0), lambda t: TF.softmax(t, 0), ()),
    ("log_softmax", F.log_softmax, lambda t: TF.log_softmax(t, -1), ()),
    ("silu", F.silu, TF.silu, ()),
    ("swish", F.swish, TF.silu, ()),
    ("mish", F.mish, TF.mish, ()),
    ("relu6", F.relu6, TF.relu6, (0.0, 6.0)),
    ("hard_sigmoid", F.hard_sigmoid, TF.hardsigmoid, (-3.0, 3.0)),
    ("hard_swish", F.hard_swish, TF.hardswish, (-3.0, 3.0)),
]
IDS = [c[0] for c in CASES]

LAYERS = {
    "relu": nn.relu(), "leaky_relu": nn.leaky_relu(0.1), "leaky_relu_default": nn.leaky_relu(),
    "elu": nn.elu(0.7), "selu": nn.selu(), "gelu": nn.gelu(),
    "gelu_tanh": nn.gelu(approximate=True), "sigmoid": nn.sigmoid(), "tanh": nn.tanh(),
    "softmax": nn.softmax(), "softmax_axis0": nn.softmax(axis=0),
    "log_softmax": nn.log_softmax(),
    "silu": nn.silu(), "swish": nn.swish(), "mish": nn.mish(), "relu6": nn.relu6(),
    "hard_sigmoid": nn.hard_sigmoid(), "hard_swish": nn.hard_swish(),
}


@pytest.mark.parametrize("name, fn, ref, kinks", CASES, ids=IDS)
def test_values_match_torch(name, fn, ref, kinks):
    x = np.concatenate([np.linspace(-6, 6, 49), [0.0, -0.0, 1e-9, -1e-9, 30.0, -30.0,
                                                 3.0, -3.0, 6.0, 2.5, -2.5]])
    x = x.reshape(-1, 5) if x.size % 5 == 0 else np.pad(x, (0, 5 - x.size % 5)).reshape(-1, 5)
    y = np.asarray(fn(jnp.asarray(x)))
    np.testing.assert_allclose(y, ref(torch.tensor(x)).numpy(), rtol=1e-12, atol=1e-12)


def test_closed_forms():
    x = jnp.asarray(np.linspace(-3, 3, 13))
    np.testing.assert_allclose(np.asarray(F.sigmoid(x)), 1 / (1 + np.exp(-np.asarray(x))))
    np.testing.assert_allclose(np.asarray(F.selu(x)),
                               np.asarray(jax.nn.selu(x)), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(F.elu(x)), np.asarray(jax.nn.elu(x)), rtol=1e-12)
    # log_softmax is stable for huge logits and exp(log_softmax) == softmax
    big = jnp.asarray([[1000.0, 0.0, -1000.0]])
    assert np.all(np.isfinite(np.asarray(F.log_softmax(big))))
    np.testing.assert_allclose(np.asarray(F.log_softmax(big))[0, 0], 0.0, atol=1e-12)
    s = np.asarray(F.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)))))
    np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name, fn, ref, kinks", CASES, ids=IDS)
def test_layer_equals_function(name, fn, ref, kinks):
    layer = LAYERS[name]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5)))
    out, params, state = layer.init(jax.random.key(0), x.shape)
    assert out == x.shape and params == {} and state == {}
    y, s = layer.apply(params, state, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x)))
    assert s == {}


GRAD_CASES = [c for c in CASES if c[0] not in ("leaky_relu_default", "softmax_axis0", "swish")]


@pytest.mark.parametrize("name, fn, ref, kinks", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
@settings(max_examples=2)
@given(data=st.data())
def test_gradients_order2(name, fn, ref, kinks, data):
    """float64, orders 1-2, forward and reverse mode, inputs 0.05 away from kinks."""
    x = data.draw(ft.arrays(SHAPE, min_value=-3.0, max_value=3.0, kinks=kinks, margin=0.05))
    ft.check_gradients(jax.jit(fn), (x,), order=2)


# ----------------------------------------------------------------------------- PReLU


def test_prelu_values_and_torch():
    layer = nn.prelu(init_slope=0.25)
    x = np.random.default_rng(2).normal(size=(5, 3))
    out, params, _ = layer.init(jax.random.key(0), x.shape)
    assert out == x.shape and params["alpha"].shape == (3,)
    np.testing.assert_allclose(np.asarray(params["alpha"]), 0.25)
    alpha = jnp.asarray([0.1, 0.2, -0.3])
    y, _ = layer.apply({"alpha": alpha}, {}, jnp.asarray(x))
    ref = TF.prelu(torch.tensor(x), torch.tensor(np.asarray(alpha)))
    np.testing.assert_allclose(np.asarray(y), ref.numpy(), rtol=1e-12)
    shared_slope = nn.prelu(per_channel=False)
    _, p, _ = shared_slope.init(jax.random.key(0), (2, 4))
    assert p["alpha"].shape == ()


def test_prelu_slope_gradient():
    """d/d alpha_c sum(prelu(x)) = sum of the negative x in channel c."""
    layer = nn.prelu()
    x = np.random.default_rng(3).normal(size=(6, 4))
    _, params, _ = layer.init(jax.random.key(0), x.shape)
    params = {"alpha": params["alpha"].astype(jnp.float64)}
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, {}, jnp.asarray(x))[0]))(params)["alpha"]
    np.testing.assert_allclose(np.asarray(g), np.where(x < 0, x, 0).sum(0), rtol=1e-12)


@settings(max_examples=2)
@given(data=st.data())
def test_prelu_gradients(data):
    x = data.draw(ft.arrays((2, 3), kinks=(0.0,)))
    ft.check_layer_gradients(nn.prelu(), x, key=jax.random.key(0), order=2)
    ft.check_layer_gradients(nn.prelu(per_channel=False), x, key=jax.random.key(1), order=1)


def test_prelu_bad_rank():
    with pytest.raises(nn.ShapeError, match="per-channel PReLU needs rank >= 1"):
        nn.prelu().init(jax.random.key(0), ())


def test_activation_wrapper():
    layer = nn.activation(lambda x: x * 3, "triple")
    assert layer.name == "triple"
    y, _ = layer.apply({}, {}, jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(y), 3.0)
