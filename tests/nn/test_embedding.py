"""embedding: shapes, PyTorch equality, gradients, bad input, out-of-range indices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdl import nn
from fdl.testing import check_gradients


def _key(seed=0):
    return jax.random.key(seed)


@settings(max_examples=8)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
       num=st.integers(1, 9), features=st.integers(1, 4))
def test_shape_agreement(shape, num, features):
    layer = nn.embedding(num, features)
    out_shape, params, state = layer.init(_key(), shape)
    assert params["table"].shape == (num, features) and state == {}
    idx = jnp.asarray(np.arange(int(np.prod(shape))).reshape(shape) % num, jnp.int32)
    y, _ = layer.apply(params, state, idx)
    assert y.shape == out_shape == (*shape, features)
    np.testing.assert_array_equal(y, np.asarray(params["table"])[np.asarray(idx)])


def test_default_init_is_standard_normal():
    table = nn.embedding(2000, 50).init(_key(), (1,))[1]["table"]
    assert table.dtype == jnp.float32
    assert abs(float(table.mean())) < 0.01 and abs(float(table.std()) - 1.0) < 0.01


@pytest.mark.torch
def test_matches_torch_forward_and_gradient():
    torch = pytest.importorskip("torch")
    num, feat = 10, 4
    layer = nn.embedding(num, feat)
    _, params, _ = layer.init(_key(), (3, 5))
    idx = np.random.default_rng(0).integers(0, num, size=(3, 5))
    idx[0, :3] = 7  # repeated indices accumulate gradient
    temb = torch.nn.Embedding(num, feat)
    with torch.no_grad():
        temb.weight.copy_(torch.from_numpy(np.array(params["table"])))
    cot = np.random.default_rng(1).normal(size=(3, 5, feat)).astype(np.float32)
    ty = temb(torch.from_numpy(idx))
    (ty * torch.from_numpy(cot)).sum().backward()

    def f(p):
        return jnp.sum(layer.apply(p, {}, jnp.asarray(idx, jnp.int32))[0] * cot)

    y = layer.apply(params, {}, jnp.asarray(idx))[0]
    np.testing.assert_array_equal(y, ty.detach().numpy())
    g = jax.jit(jax.grad(f))(params)["table"]
    np.testing.assert_allclose(g, temb.weight.grad.numpy(), rtol=1e-6, atol=1e-6)


@settings(max_examples=3)
@given(idx=st.lists(st.integers(0, 4), min_size=2, max_size=6))
def test_gradients(idx):
    layer = nn.embedding(5, 3)
    _, params, _ = layer.init(_key(), (len(idx),))
    x = jnp.asarray(idx, jnp.int32)[None]
    check_gradients(lambda p: layer.apply(p, {}, x)[0], ({"table": params["table"]},), order=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_])
def test_refuses_non_integer_input(dtype):
    layer = nn.embedding(5, 3)
    _, params, _ = layer.init(_key(), (2,))
    with pytest.raises(nn.ShapeError, match=r"expected integer indices, got dtype"):
        layer.apply(params, {}, jnp.zeros((2,), dtype))
    with pytest.raises(nn.ShapeError, match="integer indices"):  # also under jit
        jax.jit(lambda x: layer.apply(params, {}, x)[0])(jnp.zeros((2,), dtype))


def test_out_of_range_indices():
    layer = nn.embedding(5, 3)
    _, params, _ = layer.init(_key(), (3,))
    for bad in ([0, 5, 1], [-1, 0, 0]):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
            layer.apply(params, {}, jnp.asarray(bad))
    # under jit the indices cannot be checked: they are clamped (documented)
    y = jax.jit(lambda x: layer.apply(params, {}, x)[0])(jnp.asarray([-3, 9, 2]))
    t = np.asarray(params["table"])
    np.testing.assert_array_equal(y, t[[0, 4, 2]])


def test_bad_hyperparameters_and_shapes():
    with pytest.raises(ValueError, match=r"num_embeddings must be an integer >= 1"):
        nn.embedding(0, 3)
    with pytest.raises(ValueError, match=r"features must be an integer >= 1"):
        nn.embedding(4, -2)
    with pytest.raises(nn.ShapeError, match="rank >= 1"):
        nn.embedding(4, 2).init(_key(), ())
