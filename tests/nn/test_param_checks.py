"""Params that do not fit the model raise a ShapeError naming the first differing path and the
expected vs given shapes, from every combinator, instead of a bare KeyError, a reshape
TypeError, an error blamed on the next layer, or a silently different output."""

import jax
import jax.numpy as jnp
import pytest

from fdl import nn


def _cnn():
    return nn.serial(("conv1", nn.conv2d(6, 3, padding=1)), ("bn1", nn.batch_norm()),
                     ("act", nn.relu()), ("flat", nn.flatten()), ("fc", nn.dense(10)))


X = jnp.zeros((2, 8, 8, 1))


def _init(net, shape=(2, 8, 8, 1)):
    _, p, s = net.init(jax.random.key(0), shape)
    return p, s


def test_renamed_layer_names_the_path():
    net = _cnn()
    p, s = _init(net)
    p["fc2"] = p.pop("fc")
    with pytest.raises(nn.ShapeError, match=r"layer 'fc' \(dense\): params of this layer are "
                                            r"missing \(expected params \['b', 'w'\]\); the "
                                            r"params have unexpected \['fc2'\] instead"):
        net.apply(p, s, X)


def test_wrong_conv_out_channels_blames_the_conv_not_the_next_layer():
    net = _cnn()
    p, s = _init(net)
    p["conv1"]["w"] = jnp.zeros((3, 3, 1, 8))
    with pytest.raises(nn.ShapeError, match=r"layer 'conv1' \(conv2d\): param 'w' expected "
                                            r"shape \(3, 3, 1, 6\), given shape \(3, 3, 1, 8\)"):
        net.apply(p, s, X)


def test_consistently_wrong_head_is_not_silent():
    net = _cnn()
    p, s = _init(net)
    p["fc"] = {"w": jnp.zeros((384, 12)), "b": jnp.zeros(12)}  # 12 classes instead of 10
    with pytest.raises(nn.ShapeError, match=r"'fc' \(dense\): param 'w' expected shape "
                                            r"\(384, 10\), given shape \(384, 12\)"):
        net.apply(p, s, X)


def test_gru_params_in_an_lstm():
    lstm = nn.serial(("rnn", nn.lstm(8)), ("head", nn.dense(3)))
    gru = nn.serial(("rnn", nn.gru(8)), ("head", nn.dense(3)))
    _, p_gru, _ = gru.init(jax.random.key(0), (2, 5, 4))
    _, _, s = lstm.init(jax.random.key(0), (2, 5, 4))
    with pytest.raises(nn.ShapeError, match=r"layer 'rnn' \(.*\): param '.*' expected shape "
                                            r"\(.*32.*\), given shape \(.*24.*\)"):
        lstm.apply(p_gru, s, jnp.zeros((2, 5, 4)))


def test_missing_extra_and_non_dict_params():
    net = _cnn()
    p, s = _init(net)
    del p["fc"]["b"]
    with pytest.raises(nn.ShapeError, match=r"'fc' \(dense\): param 'b' missing"):
        net.apply(p, s, X)
    p, s = _init(net)
    p["fc"]["extra"] = jnp.zeros(3)
    with pytest.raises(nn.ShapeError, match=r"param 'extra' unexpected"):
        net.apply(p, s, X)
    p, s = _init(net)
    p["fc"] = jnp.zeros((384, 10))
    with pytest.raises(nn.ShapeError, match=r"'fc' \(dense\): params: expected a dict of "
                                            r"params, given shape"):
        net.apply(p, s, X)


def test_parallel_and_residual_check_too():
    par = nn.parallel(("a", nn.dense(3)), ("b", nn.dense(4)))
    _, p, s = par.init(jax.random.key(0), (2, 5))
    p["b"]["w"] = jnp.zeros((5, 3))
    with pytest.raises(nn.ShapeError, match=r"layer 'b' \(dense\): param 'w' expected shape "
                                            r"\(5, 4\)"):
        par.apply(p, s, jnp.zeros((2, 5)))
    res = nn.residual(nn.serial(("fc", nn.dense(5)), nn.relu()))
    _, p, s = res.init(jax.random.key(0), (2, 5))
    p["body"]["fc"]["w"] = jnp.zeros((5, 6))
    with pytest.raises(nn.ShapeError, match=r"layer 'body/fc' \(dense\): param 'w'"):
        res.apply(p, s, jnp.zeros((2, 5)))


def test_under_jit_and_grad_and_nested_models_pass():
    net = nn.serial(("block", _cnn()), ("out", nn.dense(2)))
    p, s = _init(net)
    leaves = jax.tree.leaves(p)
    y, _ = net.apply(p, s, X)  # the check never touches the caller's params
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(p), strict=True))
    y, _ = jax.jit(net.apply)(p, s, X)
    assert y.shape == (2, 2)
    g = jax.grad(lambda p: net.apply(p, s, X)[0].sum())(p)
    assert jax.tree.structure(g) == jax.tree.structure(p)
    bad = jax.tree.map(lambda a: a, p)
    bad["block"]["bn1"]["scale"] = jnp.ones(7)
    with pytest.raises(nn.ShapeError, match=r"layer 'block/bn1' \(batch_norm\): param 'scale' "
                                            r"expected shape \(6,\), given shape \(7,\)"):
        jax.jit(net.apply)(bad, s, X)


def test_a_parent_may_hand_an_inner_combinator_a_superset():
    """A custom composite applying an inner serial to all of its params (its own extra
    entries included) is fine; only the user's top-level call refuses unexpected params."""
    from fdl.nn.core import Layer, apply_child, init_child

    body = nn.serial(("fc", nn.dense(3)))
    extra = nn.dense(3)

    def init(key, in_shape):
        out, p, s = init_child("body", body, jax.random.fold_in(key, 0), in_shape)
        _, q, _ = init_child("skip", extra, jax.random.fold_in(key, 1), in_shape)
        return out, {**p, "skip": q}, s

    def apply(params, state, x, *, key=None, train=False):
        y, _ = apply_child("body", body, params, state, x)  # the whole dict, "skip" too
        z, _ = apply_child("skip", extra, params["skip"], {}, x)
        return y + z, state

    block = Layer(init, apply, name="block", children=(("body", body), ("skip", extra)))
    _, p, s = block.init(jax.random.key(0), (2, 4))
    y, _ = block.apply(p, s, jnp.ones((2, 4)))
    assert y.shape == (2, 3)
    bad = {**p, "fc": {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}}
    with pytest.raises(nn.ShapeError, match=r"param 'w' expected shape \(4, 3\)"):
        block.apply(bad, s, jnp.ones((2, 4)))
