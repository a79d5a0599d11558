"""The layer core: combinators, naming, sharing, keys, state threading, summary, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl import nn
from fdl.nn import Layer, ShapeError


def _init(layer, shape, seed=0):
    return layer.init(jax.random.key(seed), shape)


def _init_abstract(layer, shape, seed=0):
    """init under ``jax.eval_shape``: shapes and errors without compiling the initializers."""
    return jax.eval_shape(lambda k: layer.init(k, shape)[1:], jax.random.key(seed))


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _dense(p, x):
    return x @ p["w"] + p["b"]


def counter() -> Layer:
    """A stateful test layer: state ``{"n": count of train-mode calls}``; output ``x + n``."""

    def init(key, in_shape):
        return tuple(in_shape), {}, {"n": jnp.zeros((), jnp.int32)}

    def apply(params, state, x, *, key=None, train=False):
        n = state["n"] + 1 if train else state["n"]
        return x + n, {"n": n}

    return Layer(init, apply, name="counter")


def noise() -> Layer:
    """Adds N(0, 1) noise drawn from the apply key (train mode only)."""

    def init(key, in_shape):
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if not train:
            return x, state
        nn.require_key("noise", key)
        return x + jax.random.normal(key, x.shape, x.dtype), state

    return Layer(init, apply, name="noise")


# ----------------------------------------------------------------------------- serial


def test_serial_shapes_values_and_auto_names():
    net = nn.serial(nn.dense(4), nn.relu(), nn.dense(2))
    out, params, state = _init(net, (3, 5))
    assert out == (3, 2)
    assert set(params) == {"0", "2"}  # parameter-free children are omitted
    assert params["0"]["w"].shape == (5, 4) and params["2"]["w"].shape == (4, 2)
    assert state == {}
    x = _x((3, 5))
    y, new_state = net.apply(params, state, x)
    expect = _dense(params["2"], jnp.maximum(_dense(params["0"], x), 0))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expect), rtol=1e-6)
    assert new_state == {}
    assert [n for n, _ in net.children] == ["0", "1", "2"]


def test_serial_explicit_names_and_list_form():
    net = nn.serial(("fc1", nn.dense(4)), ("act", nn.tanh()), ("out", nn.dense(1)))
    _, params, _ = _init(net, (2, 3))
    assert set(params) == {"fc1", "out"}
    net2 = nn.serial([nn.dense(4), nn.tanh()])
    _, params2, _ = _init(net2, (2, 3))
    assert set(params2) == {"0"}


def test_duplicate_and_bad_names():
    with pytest.raises(ValueError, match=r"duplicate child names \['fc'\]"):
        nn.serial(("fc", nn.dense(2)), ("fc", nn.dense(3)))
    with pytest.raises(ValueError, match=r"duplicate child names \['a'\]"):
        nn.parallel(("a", nn.dense(2)), ("a", nn.dense(3)))
    with pytest.raises(ValueError, match="contain no '/'"):
        nn.serial(("a/b", nn.dense(2)))
    with pytest.raises(ValueError, match="non-empty"):
        nn.serial(("", nn.dense(2)))
    with pytest.raises(TypeError, match="expected a Layer or a"):
        nn.serial(nn.dense(2), "relu")
    # auto-names clash with an explicit "1"
    with pytest.raises(ValueError, match="duplicate child names"):
        nn.serial(nn.dense(2), ("0", nn.dense(2)))


# ----------------------------------------------------------------------------- parallel


def test_parallel_concat_sum_tuple():
    x = _x((2, 3))
    cat = nn.parallel(("a", nn.dense(4)), ("b", nn.dense(2)))
    out, p, _ = _init(cat, (2, 3))
    assert out == (2, 6)
    y, _ = cat.apply(p, {}, x)
    np.testing.assert_allclose(
        np.asarray(y), np.concatenate([_dense(p["a"], x), _dense(p["b"], x)], -1), rtol=1e-6
    )

    summ = nn.parallel(nn.dense(3), nn.dense(3), nn.identity(), combine="sum")
    out, p, _ = _init(summ, (2, 3))
    assert out == (2, 3) and set(p) == {"0", "1"}
    y, _ = summ.apply(p, {}, x)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(_dense(p["0"], x) + _dense(p["1"], x) + x), rtol=1e-6
    )

    tup = nn.parallel(nn.dense(4), nn.tanh(), combine="tuple")
    out, p, _ = _init(tup, (2, 3))
    assert out == ((2, 4), (2, 3))
    y, _ = tup.apply(p, {}, x)
    assert isinstance(y, tuple) and y[0].shape == (2, 4)
    np.testing.assert_allclose(np.asarray(y[1]), np.tanh(np.asarray(x)))


def test_parallel_concat_other_axis_and_errors():
    net = nn.parallel(nn.conv2d(2, 1), nn.conv2d(3, 1))
    out, _, _ = _init(net, (1, 4, 4, 2))
    assert out == (1, 4, 4, 5)
    net = nn.parallel(nn.identity(), nn.identity(), axis=1)
    out, _, _ = _init(net, (2, 3))
    assert out == (2, 6)
    with pytest.raises(ShapeError, match="sum needs equal branch shapes"):
        _init(nn.parallel(nn.dense(2), nn.dense(3), combine="sum"), (1, 4))
    with pytest.raises(ShapeError, match="concat along axis -1 needs equal other dims"):
        _init(nn.parallel(nn.identity(), nn.max_pool2d(2)), (1, 4, 4, 2))
    with pytest.raises(ValueError, match="combine must be 'concat', 'sum' or 'tuple'"):
        nn.parallel(nn.identity(), combine="mean")


# ----------------------------------------------------------------------------- residual


def test_residual_identity_projection_and_post():
    x = _x((2, 4))
    res = nn.residual(nn.dense(4))
    out, p, _ = _init(res, (2, 4))
    assert out == (2, 4) and set(p) == {"body"}
    y, _ = res.apply(p, {}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_dense(p["body"], x) + x), rtol=1e-6)

    res = nn.residual(nn.dense(3), shortcut=nn.dense(3), post=nn.relu())
    out, p, _ = _init(res, (2, 4))
    assert out == (2, 3) and set(p) == {"body", "shortcut"}
    y, _ = res.apply(p, {}, x)
    expect = np.maximum(np.asarray(_dense(p["body"], x) + _dense(p["shortcut"], x)), 0)
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-6)

    with pytest.raises(ShapeError, match="projection shortcut") as e:
        _init(nn.serial(("blk", nn.residual(nn.dense(3)))), (2, 4))
    assert "'blk'" in str(e.value) and "(2, 3)" in str(e.value)


# ----------------------------------------------------------------------------- sharing


def test_shared_params_and_gradient_is_sum_over_uses():
    net = nn.serial(("fc", nn.dense(3)), ("act", nn.tanh()), ("fc_again", nn.shared("fc")))
    out, params, _ = _init(net, (2, 3))
    assert out == (2, 3)
    assert set(params) == {"fc"}  # the shared child owns nothing
    x = _x((2, 3))

    def loss_shared(p):
        return jnp.sum(net.apply(p, {}, x)[0] ** 2)

    # the same computation with the two uses as separate arguments
    def loss_two(p1, p2):
        return jnp.sum(_dense(p2, jnp.tanh(_dense(p1, x))) ** 2)

    y, _ = net.apply(params, {}, x)
    np.testing.assert_allclose(np.asarray(y),
                               np.asarray(_dense(params["fc"], jnp.tanh(_dense(params["fc"], x)))),
                               rtol=1e-6)
    g = jax.grad(loss_shared)(params)["fc"]
    g1, g2 = jax.grad(loss_two, argnums=(0, 1))(params["fc"], params["fc"])
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g1[k] + g2[k]), rtol=1e-6)
        assert not np.allclose(np.asarray(g1[k]), np.asarray(g[k]))  # both uses contribute


def test_shared_errors_and_summary():
    with pytest.raises(ValueError, match="no earlier sibling .*named 'fc'"):
        _init(nn.serial(("a", nn.dense(3)), ("b", nn.shared("fc"))), (2, 3))
    with pytest.raises(ValueError, match="no earlier sibling"):
        nn.serial(("b", nn.shared("fc")), ("fc", nn.dense(3)))
    net = nn.serial(("fc", nn.dense(3)), ("again", nn.shared("fc")))
    text = nn.summary(net, (2, 3), print_fn=lambda s: None)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("again"))
    assert "shared(fc)" in line and line.split()[-1] == "0"
    assert "total params: 12" in text


def test_shared_state_is_threaded_to_owner():
    net = nn.serial(("c", counter()), ("c2", nn.shared("c")))
    _, params, state = _init(net, (2,))
    assert set(state) == {"c"}
    y, s = net.apply(params, state, jnp.zeros(2), train=True)
    assert int(s["c"]["n"]) == 2  # both uses advanced the owner's state
    np.testing.assert_allclose(np.asarray(y), 1 + 2)


# ----------------------------------------------------------------------------- keys / state


def test_deterministic_child_keys():
    net = nn.serial(("a", nn.dense(4)), ("b", nn.dense(4)))
    _, p1, _ = _init(net, (1, 4), seed=5)
    _, p2, _ = _init(net, (1, 4), seed=5)
    _, p3, _ = _init(net, (1, 4), seed=6)
    for k in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(p1[k]["w"]), np.asarray(p2[k]["w"]))
    assert not np.allclose(np.asarray(p1["a"]["w"]), np.asarray(p1["b"]["w"]))
    assert not np.allclose(np.asarray(p1["a"]["w"]), np.asarray(p3["a"]["w"]))
    assert nn.child_key(None, 3) is None


def test_apply_keys_per_child_and_require_key():
    net = nn.serial(noise(), noise())
    _, p, s = _init(net, (1, 1000))
    x = jnp.zeros((1, 1000))
    y1, _ = net.apply(p, s, x, key=jax.random.key(1), train=True)
    y2, _ = net.apply(p, s, x, key=jax.random.key(1), train=True)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    # child i draws from fold_in(key, i): exactly the sum of two different draws
    key = jax.random.key(1)
    n0 = jax.random.normal(nn.child_key(key, 0), x.shape, x.dtype)
    n1 = jax.random.normal(nn.child_key(key, 1), x.shape, x.dtype)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(n0 + n1), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(n0), np.asarray(n1))
    y_eval, _ = net.apply(p, s, x)
    np.testing.assert_array_equal(np.asarray(y_eval), 0)
    with pytest.raises(ValueError, match="train=True needs a PRNG key"):
        net.apply(p, s, x, train=True)
    par = nn.parallel(noise(), noise(), combine="tuple")
    (a, b), _ = par.apply({}, {}, x, key=jax.random.key(2), train=True)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_state_threading_through_combinators():
    net = nn.serial(("c", counter()),
                    ("par", nn.parallel(("l", counter()), ("r", nn.identity()), combine="sum")),
                    ("res", nn.residual(counter())))
    _, params, state = _init(net, (1,))
    assert set(state) == {"c", "par", "res"}
    assert set(state["par"]) == {"l"} and set(state["res"]) == {"body"}
    s = state
    for _ in range(3):
        _, s = net.apply(params, s, jnp.zeros(1), train=True)
    assert int(s["c"]["n"]) == 3 and int(s["par"]["l"]["n"]) == 3
    assert int(s["res"]["body"]["n"]) == 3
    _, s_eval = net.apply(params, s, jnp.zeros(1), train=False)
    assert int(s_eval["c"]["n"]) == 3


# ----------------------------------------------------------------------------- errors / paths


def test_shape_error_paths_through_nested_combinators():
    net = nn.serial(
        ("features", nn.serial(("conv", nn.conv2d(4, 3)), ("pool", nn.max_pool2d(2)))),
        ("head", nn.parallel(("fc", nn.dense(2)), ("skip", nn.residual(nn.conv2d(3, 1))))),
    )
    with pytest.raises(ShapeError) as e:
        _init_abstract(net, (1, 10, 10, 3))
    err = e.value
    assert err.path == ["head", "skip"] and err.layer == "residual"
    assert str(err).startswith("layer 'head/skip' (residual)")
    # an init-time error deep inside
    with pytest.raises(ShapeError, match=r"layer 'features/conv' \(conv2d\): expected input"):
        _init_abstract(net, (1, 10, 10))
    # and at apply time
    ok = nn.serial(("block", nn.serial(("fc", nn.dense(2)))))
    _, p, s = _init(ok, (1, 3))
    with pytest.raises(ShapeError, match=r"layer 'block/fc' \(dense\).*\(1, 5\)"):
        ok.apply(p, s, jnp.ones((1, 5)))
    assert isinstance(err, ValueError)


def test_check_helpers():
    nn.check_rank("x", (1, 2), 2, "(N, C)")
    with pytest.raises(ShapeError, match=r"expected input of rank 4 NHWC, got shape \(1, 2\)"):
        nn.check_rank("x", (1, 2), 4, "NHWC")
    assert nn.check_positive_int("l", "n", 3) == 3
    assert nn.check_positive_int("l", "n", 0, allow_zero=True) == 0
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="l: n must be an integer >= 1"):
            nn.check_positive_int("l", "n", bad)


# ----------------------------------------------------------------------------- lambda / identity


def test_lambda_layer_and_identity():
    lam = nn.lambda_layer(lambda x: x.reshape(x.shape[0], -1) * 2)
    out, p, s = _init(lam, (2, 3, 4))
    assert out == (2, 12) and p == {} and s == {}
    x = _x((2, 3, 4))
    y, _ = lam.apply(p, s, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x).reshape(2, -1) * 2)
    lam2 = nn.lambda_layer(lambda x: x[:, :1], name="first", shape_fn=lambda s: (s[0], 1))
    assert _init(lam2, (5, 7))[0] == (5, 1) and lam2.name == "first"
    ident = nn.identity()
    assert _init(ident, (3, 2))[0] == (3, 2)
    y, _ = ident.apply({}, {}, x)
    assert y is x


def test_layer_call_and_init_params():
    layer = nn.dense(3)
    params, state = layer.init_params(jax.random.key(0), (1, 2))
    y1, _ = layer(params, state, jnp.ones((1, 2)))
    y2, _ = layer.apply(params, state, jnp.ones((1, 2)))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert "dense(features=3" in repr(layer)


# ----------------------------------------------------------------------------- summary


def test_summary_rows_and_counts():
    net = nn.serial(
        ("conv", nn.conv2d(4, 3, padding=1)),
        ("act", nn.relu()),
        ("block", nn.residual(nn.serial(("c1", nn.conv2d(4, 3, padding=1)), ("r", nn.relu())))),
        ("gap", nn.global_avg_pool2d()),
        ("fc", nn.dense(10)),
    )
    lines = []
    text = nn.summary(net, (2, 8, 8, 3), print_fn=lines.append)
    assert lines == [text]
    rows = {ln.split()[0]: ln for ln in text.splitlines()[2:-2]}
    assert rows["conv"].split()[-1] == f"{3 * 3 * 3 * 4 + 4:,}"
    assert "(2, 8, 8, 4)" in rows["conv"]
    assert rows["c1"].split()[-1] == f"{3 * 3 * 4 * 4 + 4}"
    assert rows["block"].split()[-1] == f"{3 * 3 * 4 * 4 + 4}"  # a row's count includes children
    assert "(2, 4)" in rows["gap"] and rows["fc"].split()[-1] == "50"
    params, _ = _init_abstract(net, (2, 8, 8, 3))
    total = nn.count_params(params)
    assert total == 112 + 148 + 50
    assert f"total params: {total:,}" in text
    # indentation shows nesting
    c1_line = next(ln for ln in text.splitlines() if ln.strip().startswith("c1"))
    assert c1_line.startswith("    c1")


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "make, shape, order",
    [
        (lambda: nn.serial(nn.dense(3), nn.tanh(), nn.dense(2)), (2, 3), 2),
        (lambda: nn.parallel(nn.dense(2), nn.sigmoid(), combine="concat"), (2, 3), 1),
        (lambda: nn.parallel(nn.dense(3), nn.tanh(), combine="sum"), (2, 3), 1),
        (lambda: nn.residual(nn.serial(nn.dense(3), nn.tanh()), shortcut=nn.dense(3),
                             post=nn.tanh()), (2, 3), 2),
        (lambda: nn.serial(("fc", nn.dense(3)), ("t", nn.tanh()), ("fc2", nn.shared("fc"))),
         (2, 3), 1),
    ],
)
@settings(max_examples=2)
@given(seed=st.integers(0, 2**16))
def test_combinator_gradients(make, shape, order, seed):
    x = np.random.default_rng(seed).normal(size=shape)
    ft.check_layer_gradients(make(), x, key=jax.random.key(seed), order=order)
