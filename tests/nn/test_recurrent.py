"""Recurrent cells, the scan driver and the rnn/gru/lstm layers (PyTorch equality is in
tests/interop/test_torch_rnn.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.nn as nn
from fdl import config
from fdl.nn import recurrent as R
from fdl.testing import check_gradients, check_layer_gradients

KINDS = ["rnn", "gru", "lstm"]
CELLS = {"rnn": R.rnn_cell, "gru": R.gru_cell, "lstm": R.lstm_cell}
MAKE = {"rnn": nn.rnn, "gru": nn.gru, "lstm": nn.lstm}


def _params(kind, n_in, hidden, seed=0, dtype=jnp.float64):
    return R.init_direction_params(jax.random.key(seed), kind, n_in, hidden, dtype)


def _carry(kind, batch, hidden, seed=1, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, dtype)
    if kind == "lstm":
        return (h, jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, dtype))
    return h


def _loop(kind, params, xs, carry, reverse=False):
    """Reference: a Python loop over time (time-major xs, pre-projected)."""
    cell = CELLS[kind]
    ys = [None] * xs.shape[0]
    order = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    for t in order:
        carry, ys[t] = cell(params, carry, xs[t])
    return carry, jnp.stack(ys)


def _allclose(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ----------------------------------------------------------------------------- driver


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_equals_python_loop_and_unroll_invariant(kind, reverse):
    T, B, F, H = 7, 3, 4, 5
    p = _params(kind, F, H)
    xs = R.project_inputs(kind, p, jnp.asarray(np.random.default_rng(2).normal(size=(T, B, F))))
    c0 = _carry(kind, B, H)
    ref = _loop(kind, p, xs, c0, reverse)
    for unroll in (1, 2, 3, 7):
        got = R.scan_cell(CELLS[kind], p, xs, c0, reverse=reverse, unroll=unroll)
        _allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_major_equals_time_major(kind):
    T, B, F, H = 5, 2, 3, 4
    p = _params(kind, F, H)
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(T, B, 4 * H)))[..., : R.CELL_GATES[
        kind] * H]
    c0 = _carry(kind, B, H)
    c_t, y_t = R.scan_cell(CELLS[kind], p, xs, c0)
    c_b, y_b = R.scan_cell(CELLS[kind], p, jnp.swapaxes(xs, 0, 1), c0, time_major=False)
    _allclose(c_t, c_b, rtol=1e-12)
    _allclose(y_t, jnp.swapaxes(y_b, 0, 1), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_seq_lengths_semantics(kind, reverse):
    """Each sequence equals running the driver on its own truncated prefix: final carry at its
    last valid step, outputs zero past the length; reverse runs backwards from length-1."""
    T, B, F, H = 6, 4, 3, 4
    lens = np.array([6, 1, 3, 0])
    p = _params(kind, F, H)
    xs = R.project_inputs(kind, p, jnp.asarray(np.random.default_rng(4).normal(size=(T, B, F))))
    c0 = _carry(kind, B, H)
    carry, ys = R.scan_cell(CELLS[kind], p, xs, c0, reverse=reverse, seq_lengths=lens, unroll=2)
    for b, n in enumerate(lens):
        cb = jax.tree_util.tree_map(lambda a: a[b : b + 1], c0)
        got_c = jax.tree_util.tree_map(lambda a: a[b : b + 1], carry)
        if n == 0:
            _allclose(got_c, cb, rtol=0, atol=0)
        else:
            ref_c, ref_y = _loop(kind, p, xs[:n, b : b + 1], cb, reverse)
            _allclose(got_c, ref_c, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(ys[:n, b : b + 1], ref_y, rtol=1e-12, atol=1e-12)
        assert np.all(np.asarray(ys[n:, b]) == 0)


def test_reverse_within_lengths_is_an_involution():
    xs = jnp.arange(5 * 3).reshape(5, 3)[..., None]
    lens = jnp.array([5, 2, 0])
    r = R.reverse_within_lengths(xs, lens)
    np.testing.assert_array_equal(r[:, 0, 0], [12, 9, 6, 3, 0])
    np.testing.assert_array_equal(r[:, 1, 0], [4, 1, 7, 10, 13])
    np.testing.assert_array_equal(r[:, 2, 0], xs[:, 2, 0])
    np.testing.assert_array_equal(R.reverse_within_lengths(r, lens), xs)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("kind", KINDS)
def test_layer_shapes_names_and_init_apply_agree(kind, key):
    layer = MAKE[kind](6, num_layers=2, bidirectional=True)
    out_shape, params, state = layer.init(key, (3, 5, 4))
    g = R.CELL_GATES[kind]
    assert layer.carry == "reset"  # the default (and only) mode of a bidirectional layer
    want = {"h": (3, 4, 6), "c": (3, 4, 6)} if kind == "lstm" else {"h": (3, 4, 6)}
    assert jax.tree_util.tree_map(jnp.shape, state) == want
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(state))
    assert set(params) == {"l0", "l1"} and set(params["l0"]) == {"fwd", "bwd"}
    assert params["l0"]["fwd"]["w_ih"].shape == (4, g * 6)
    assert params["l1"]["bwd"]["w_ih"].shape == (12, g * 6)
    assert params["l1"]["bwd"]["w_hh"].shape == (6, g * 6)
    assert params["l0"]["fwd"]["b_hh"].shape == (g * 6,)
    x = jnp.ones((3, 5, 4), jnp.float32)
    y, new_state = layer.apply(params, state, x)
    assert y.shape == out_shape == (3, 5, 12)
    y2, final = layer.apply_with_state(params, x)
    np.testing.assert_array_equal(y, y2)
    for name, a in zip(("h", "c"), jax.tree_util.tree_leaves(final), strict=False):
        np.testing.assert_array_equal(np.swapaxes(new_state[name], 0, 1), a)
    for a in jax.tree_util.tree_leaves(final):
        assert a.shape == (4, 3, 6)
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(
        layer.initial_state(3))


@pytest.mark.parametrize("kind", KINDS)
def test_time_major_layer(kind, key):
    lb = MAKE[kind](4, bidirectional=True)
    lt = MAKE[kind](4, bidirectional=True, time_major=True)
    _, params, _ = lb.init(key, (2, 5, 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    yb, sb = lb.apply_with_state(params, x)
    yt, st_ = lt.apply_with_state(params, jnp.swapaxes(x, 0, 1))
    np.testing.assert_allclose(yb, jnp.swapaxes(yt, 0, 1), rtol=1e-6, atol=1e-6)
    _allclose(sb, st_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,kw", [("rnn", {}), ("rnn", {"nonlinearity": "relu"}),
                                     ("gru", {}), ("lstm", {}), ("lstm", {"proj_size": 3}),
                                     ("gru", {"impl": "scan", "unroll": 2})])
def test_state_carry_equals_one_long_sequence(kind, kw, key):
    """The layer protocol carries the recurrence: apply on x[:, :5] then on x[:, 5:] from the
    returned state equals one apply on x (outputs and final state), under jit too."""
    layer = MAKE[kind](5, num_layers=2, **kw)
    assert layer.carry == "keep"
    _, params, state0 = layer.init(key, (2, 8, 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 3)))
    params, state0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), (params, state0))
    apply = jax.jit(layer.apply)
    y, s = apply(params, state0, x)
    y1, s1 = apply(params, state0, x[:, :5])
    y2, s2 = apply(params, s1, x[:, 5:])
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    _allclose(s2, s, rtol=1e-12, atol=1e-12)
    # the state keeps its dtype from call to call
    assert {a.dtype for a in jax.tree_util.tree_leaves(s2)} == {jnp.dtype(jnp.float64)}
    _, s32 = apply(params, layer.init(key, (2, 8, 3))[2], x)
    assert {a.dtype for a in jax.tree_util.tree_leaves(s32)} == {jnp.dtype(jnp.float32)}
    # an empty state means zeros, like the state init returned
    _allclose(layer.apply(params, {}, x), (y, s), rtol=0, atol=0)


def test_carry_reset_mode_and_state_helpers(key):
    """carry="reset" starts every call from zeros (and still returns the final carry);
    nn.reset_state zeros a path; nn.init_state builds a state for another batch size."""
    keep, reset = nn.gru(4), nn.gru(4, carry="reset")
    model = nn.serial(("rnn", keep), ("out", nn.dense(2)))
    _, params, state = model.init(key, (3, 6, 2))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6, 2)), jnp.float32)
    _, s1 = model.apply(params, state, x)
    assert not np.allclose(s1["rnn"]["h"], 0)
    y_again, _ = model.apply(params, s1, x)
    y_fresh, _ = model.apply(params, nn.reset_state(s1, "rnn"), x)
    np.testing.assert_array_equal(y_fresh, model.apply(params, state, x)[0])
    assert not np.allclose(y_again, y_fresh)
    y_r, s_r = reset.apply(params["rnn"], s1["rnn"], x)  # ignores the given carry
    np.testing.assert_array_equal(y_r, keep.apply(params["rnn"], {}, x)[0])
    np.testing.assert_array_equal(s_r["h"], s1["rnn"]["h"])
    one = nn.init_state(model, (1, 6, 2))
    assert one["rnn"]["h"].shape == (1, 1, 4) and np.all(np.asarray(one["rnn"]["h"]) == 0)
    with pytest.raises(KeyError, match="decoder"):
        nn.reset_state(s1, "decoder/rnn")
    with pytest.raises(ValueError, match="bidirectional"):
        nn.lstm(4, bidirectional=True, carry="keep")
    with pytest.raises(ValueError, match="carry"):
        nn.gru(4, carry="sometimes")


def test_bad_state_and_lengths_name_the_layer(key):
    """A state from another batch size or another layer, and out-of-range lengths: a
    ShapeError naming the layer path, the expected and the given shapes; under jit the
    length check raises at run time instead of returning NaN."""
    model = nn.serial(("enc", nn.serial(("rnn", nn.lstm(4, num_layers=2)))),
                      ("out", nn.dense(2)))
    _, params, state = model.init(key, (3, 5, 2))
    x = jnp.ones((3, 5, 2))
    with pytest.raises(nn.ShapeError, match=r"'enc/rnn' \(lstm\).*\(2, 2, 4\).*batch of 2, "
                                            r"got \(3, 2, 4\)"):
        model.apply(params, state, x[:2])
    _, _, gru_state = nn.gru(4, num_layers=2).init(key, (3, 5, 2))
    with pytest.raises(nn.ShapeError, match=r"'enc/rnn'.*keys \['c', 'h'\], got \['h'\]"):
        model.apply(params, {"enc": {"rnn": gru_state}}, x)
    _, _, wide = nn.lstm(6, num_layers=2).init(key, (3, 5, 2))
    with pytest.raises(nn.ShapeError, match=r"expected state\['h'\] of shape \(3, 2, 4\)"):
        model.apply(params, {"enc": {"rnn": wide}}, x)
    layer = nn.gru(4)
    _, p, s = layer.init(key, (2, 5, 2))
    for bad in ([9, 2], [-1, 2]):
        with pytest.raises(nn.ShapeError, match=r"seq_lengths must lie in \[0, 5\]"):
            layer.apply(p, s, x[:2], seq_lengths=jnp.array(bad))
    with pytest.raises(nn.ShapeError, match="integer seq_lengths"):
        layer.apply(p, s, x[:2], seq_lengths=jnp.array([1.0, 2.0]))
    f = jax.jit(lambda lens: layer.apply(p, s, x[:2], seq_lengths=lens)[0])
    assert f(jnp.array([5, 0])).shape == (2, 5, 4)
    with pytest.raises(Exception, match=r"seq_lengths must lie in \[0, 5\]"):
        jax.block_until_ready(f(jnp.array([9, 2])))


def test_detach_state_stops_gradient(key):
    layer = nn.gru(4)
    _, params, _ = layer.init(key, (2, 3, 3))
    x = jnp.ones((2, 3, 3))

    def f(h0, detach):
        h0 = R.detach_state(h0) if detach else h0
        y, _ = layer.apply_with_state(params, x, h0)
        return jnp.sum(y)

    h0 = jnp.ones((1, 2, 4))
    assert np.all(np.asarray(jax.grad(f)(h0, True)) == 0)
    assert np.any(np.asarray(jax.grad(f)(h0, False)) != 0)


def test_dropout_between_layers(key):
    layer = nn.gru(8, num_layers=2, dropout=0.5)
    _, params, _ = layer.init(key, (2, 4, 3))
    x = jnp.ones((2, 4, 3))
    y_eval, _ = layer.apply(params, {}, x)
    y_eval2, _ = layer.apply(params, {}, x, train=False)
    np.testing.assert_array_equal(y_eval, y_eval2)
    k1, k2 = jax.random.split(jax.random.key(1))
    y1, _ = layer.apply(params, {}, x, key=k1, train=True)
    y1b, _ = layer.apply(params, {}, x, key=jax.random.clone(k1), train=True)
    y2, _ = layer.apply(params, {}, x, key=k2, train=True)
    np.testing.assert_array_equal(y1, y1b)
    assert not np.allclose(y1, y_eval) and not np.allclose(y1, y2)
    with pytest.raises(ValueError, match="key"):
        layer.apply(params, {}, x, train=True)
    # a single layer has no between-layer dropout: train == eval without a key
    one = nn.gru(8, dropout=0.5)
    _, p1, _ = one.init(key, (2, 4, 3))
    np.testing.assert_array_equal(one.apply(p1, {}, x, train=True)[0], one.apply(p1, {}, x)[0])


def test_bad_inputs(key):
    layer = nn.lstm(4, num_layers=2)
    with pytest.raises(nn.ShapeError, match="rank 3"):
        layer.init(key, (3, 4))
    _, params, _ = layer.init(key, (2, 3, 5))
    with pytest.raises(nn.ShapeError, match="5 features"):
        layer.apply(params, {}, jnp.ones((2, 3, 6)))
    with pytest.raises(nn.ShapeError, match="rank 3"):
        layer.apply(params, {}, jnp.ones((3, 5)))
    with pytest.raises(nn.ShapeError, match="initial_state"):
        layer.apply_with_state(params, jnp.ones((2, 3, 5)), (jnp.zeros((1, 2, 4)),) * 2)
    with pytest.raises(nn.ShapeError, match="pair"):
        layer.apply_with_state(params, jnp.ones((2, 3, 5)), jnp.zeros((2, 2, 4)))
    with pytest.raises(nn.ShapeError, match="seq_lengths"):
        layer.apply_with_state(params, jnp.ones((2, 3, 5)), seq_lengths=jnp.array([1, 2, 3]))
    for bad in (dict(hidden_size=0), dict(hidden_size=4, num_layers=0),
                dict(hidden_size=4, dropout=1.0), dict(hidden_size=4, dropout=-0.1),
                dict(hidden_size=4, unroll=0), dict(hidden_size=4, impl="cudnn")):
        with pytest.raises(ValueError):
            nn.gru(**bad)


def test_layer_under_jit_and_serial(key):
    model = nn.serial(("rnn", nn.gru(6, bidirectional=True)), ("out", nn.dense(2)))
    out_shape, params, state = model.init(key, (2, 5, 3))
    y, _ = jax.jit(lambda p, x: model.apply(p, state, x))(params, jnp.ones((2, 5, 3)))
    assert y.shape == out_shape == (2, 5, 2)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=3)
@given(batch=st.sampled_from([1, 2]), hidden=st.sampled_from([2]), seed=st.integers(0, 2**16))
def test_cell_gradients(kind, batch, hidden, seed):
    p = {k: v for k, v in _params(kind, 2, hidden, seed).items() if k in ("w_hh", "b_hh")}
    g = R.CELL_GATES[kind]
    rng = np.random.default_rng(seed)
    xp = jnp.asarray(rng.normal(size=(batch, g * hidden)))
    c = _carry(kind, batch, hidden, seed)
    check_gradients(jax.jit(CELLS[kind]), (p, c, xp), order=2)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=2)
@given(steps=st.integers(1, 4), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_driver_gradients_with_lengths(kind, steps, reverse, seed):
    B, F, H = 2, 2, 2
    rng = np.random.default_rng(seed)
    p = _params(kind, F, H, seed)
    x = jnp.asarray(rng.normal(size=(steps, B, F)))
    c0 = _carry(kind, B, H, seed)
    lens = jnp.asarray(rng.integers(0, steps + 1, size=B))

    @jax.jit
    def f(p, x, c0):
        xp = R.project_inputs(kind, p, x)
        return R.scan_cell(CELLS[kind], p, xp, c0, reverse=reverse, seq_lengths=lens)

    check_gradients(f, (p, x, c0), order=1, dense_check_max_size=0)


@pytest.mark.parametrize("kind", [pytest.param("rnn", marks=pytest.mark.slow),
                                  pytest.param("gru", marks=pytest.mark.slow), "lstm"])
@pytest.mark.parametrize("impl", ["fused", pytest.param("scan", marks=pytest.mark.slow)])
def test_layer_gradients_deep_bidirectional(kind, impl, key):
    layer = MAKE[kind](2, num_layers=2, bidirectional=True, impl=impl)
    x = np.random.default_rng(0).normal(size=(2, 2, 2))
    check_layer_gradients(layer, x, key=key, order=1, modes=("fwd", "rev"),
                          dense_check_max_size=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_scan_values_and_gradients(kind, key):
    lf = MAKE[kind](3, num_layers=2, bidirectional=True)
    ls = MAKE[kind](3, num_layers=2, bidirectional=True, impl="scan", unroll=3)
    _, p, _ = lf.init(key, (2, 5, 4))
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4)))
    s0 = jax.tree_util.tree_map(lambda a: a + 0.3, lf.initial_state(2, jnp.float64))

    def loss(layer):
        def g(p, x, s0):
            y, s = layer.apply_with_state(p, x, s0)
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(a))
                                             for a in jax.tree_util.tree_leaves(s))
        return g

    vf, gf = jax.jit(jax.value_and_grad(loss(lf), argnums=(0, 1, 2)))(p, x, s0)
    vs, gs = jax.jit(jax.value_and_grad(loss(ls), argnums=(0, 1, 2)))(p, x, s0)
    np.testing.assert_allclose(vf, vs, rtol=1e-12)
    _allclose(gf, gs, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- fused_direction


@pytest.mark.parametrize("kind,order", [("rnn", 1), ("gru", 1), ("lstm", 1),
                                        pytest.param("lstm", 2, marks=pytest.mark.slow)])
@settings(max_examples=2, deadline=None)
@given(steps=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_fused_direction_gradients(kind, order, steps, seed):
    """float64 (always the XLA loops): the hand-written VJP of projection + recurrence and its
    forward mode (the JVP whose transpose is that VJP) against finite
    differences, for every parameter, the input and the initial state."""
    B, F, H = 2, 3, 2
    rng = np.random.default_rng(seed)
    p = _params(kind, F, H, seed)
    x = jnp.asarray(rng.normal(size=(steps, B, F)))
    c0 = _carry(kind, B, H, seed)

    @jax.jit
    def f(p, x, c0):
        return R.fused_direction(kind, p, x, c0, unroll=2)

    check_gradients(f, (p, x, c0), order=order, modes=("fwd", "rev"), dense_check_max_size=0)


def _native_or_skip():
    from fdl._ext import loader

    st = loader.load("rnn")
    if not st.loaded:
        pytest.skip(f"native RNN library unavailable: {st.reason}")


def _loss_and_grad(layer):
    """Jitted value and gradients (params, input, initial state) of a loss of ``layer``'s
    outputs and final state; traced on first use, so under the rnn_backend set then."""

    def loss(p, x, s0):
        y, s = layer.apply_with_state(p, x, s0)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(a))
                                         for a in jax.tree_util.tree_leaves(s))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("steps", [pytest.param(1, marks=pytest.mark.slow), 6])
def test_native_loop_equals_xla_and_scan(kind, steps, key):
    """float32: the C++ time loop (rnn_backend 'native') gives the values and gradients of
    the XLA loop and of autodiff through scan_cell (deep, bidirectional, non-zero state)."""
    _native_or_skip()
    layers = {impl: MAKE[kind](5, num_layers=2, bidirectional=True, impl=impl)
              for impl in ("fused", "scan")}
    _, p, _ = layers["fused"].init(key, (3, steps, 4))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, steps, 4)), jnp.float32)
    s0 = jax.tree_util.tree_map(lambda a: a + 0.3, layers["fused"].initial_state(3))

    def run(impl, backend):
        with config.override(rnn_backend=backend):
            f = _loss_and_grad(layers[impl])
            text = f.lower(p, x, s0).as_text()
            return f(p, x, s0), text

    (vn, gn), text = run("fused", "native")
    assert "fdl_lstm_fwd" in text or "fdl_gru_fwd" in text
    (vx, gx), text = run("fused", "xla")
    assert "fdl_" not in text
    (vs, gs), _ = run("scan", "xla")
    for v, g in ((vx, gx), (vs, gs)):
        np.testing.assert_allclose(vn, v, rtol=1e-5)
        _allclose(gn, g, rtol=2e-4, atol=2e-5)


def _native_vs_xla(kind, loss, args):
    out = {}
    for backend in ("native", "xla"):
        with config.override(rnn_backend=backend):
            f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            text = f.lower(*args).as_text()
            assert (f"fdl_{kind}_bwd_dw" in text) == (backend == "native")
            out[backend] = f(*args)
    return out


@pytest.mark.parametrize("shape", [(7, 64, 5, 64), (3, 32, 4, 130), (2, 4, 3, 8), (1, 32, 3, 64)])
def test_native_lstm_equal_xla(shape):
    """The native LSTM loops (the forward on two threads above a size threshold, the weight
    gradients accumulated by a helper thread during the backward loop) give the XLA loop's
    values and gradients."""
    _native_or_skip()
    t_len, batch, n_in, n_h = shape
    p = R.init_direction_params(jax.random.key(0), "lstm", n_in, n_h)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(t_len, batch, n_in)), jnp.float32)
    c0 = tuple(jnp.asarray(rng.normal(size=(batch, n_h)) * 0.3, jnp.float32) for _ in range(2))

    def loss(p, xs, c0):
        (h, c), ys = R.fused_direction("lstm", p, xs, c0)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(jnp.cos(h)) + jnp.sum(c * c)

    out = _native_vs_xla("lstm", loss, (p, xs, c0))
    np.testing.assert_allclose(out["native"][0], out["xla"][0], rtol=1e-5)
    _allclose(out["native"][1], out["xla"][1], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("shape", [(7, 64, 5, 64), (3, 32, 4, 130), (2, 4, 3, 8), (1, 32, 3, 64),
                                   (35, 32, 28, 256)])
def test_native_gru_equal_xla(shape):
    """The native GRU backward with the weight and bias gradients accumulated on a helper
    thread during the loop gives the XLA loop's values and gradients (b_ih and b_hh differ:
    b_hn sits inside r * (W_hn h + b_hn))."""
    _native_or_skip()
    t_len, batch, n_in, n_h = shape
    p = R.init_direction_params(jax.random.key(0), "gru", n_in, n_h)
    rng = np.random.default_rng(1)
    p = {k: v + jnp.asarray(rng.normal(size=v.shape) * 0.1, jnp.float32) for k, v in p.items()}
    xs = jnp.asarray(rng.normal(size=(t_len, batch, n_in)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, n_h)) * 0.3, jnp.float32)

    def loss(p, xs, h0):
        h, ys = R.fused_direction("gru", p, xs, h0)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(jnp.cos(h))

    out = _native_vs_xla("gru", loss, (p, xs, h0))
    np.testing.assert_allclose(out["native"][0], out["xla"][0], rtol=1e-5)
    # atol 1e-4: the (35, 32, 28, 256) case sums 1120 rows into gradients of size up to ~100
    _allclose(out["native"][1], out["xla"][1], rtol=2e-4, atol=1e-4)


def test_native_backend_choice():
    with pytest.raises(ValueError, match=r"\['auto', 'native', 'xla'\]"):
        config.update("rnn_backend", "onednn")
    layer = nn.lstm(3)
    x = jnp.ones((2, 4, 3), jnp.float64)  # float64 never uses the native loop
    _, p, _ = layer.init(jax.random.key(0), x.shape)
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    with config.override(rnn_backend="native"):
        text = jax.jit(lambda p, x: layer.apply(p, {}, x)[0]).lower(p, x).as_text()
    assert "fdl_lstm" not in text


def test_native_fallback_when_unavailable(monkeypatch, tmp_path):
    """No compiler/oneDNN: ``auto`` warns once and uses the XLA loop, ``native`` says why it
    can't."""
    from fdl._ext import loader

    monkeypatch.setattr(loader, "installed_path", lambda name: tmp_path / "missing.so")
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    loader.reset()
    layer = nn.gru(3)
    x = jnp.ones((2, 4, 3), jnp.float32)
    _, p, _ = layer.init(jax.random.key(0), x.shape)
    try:
        with config.override(native_cache=str(tmp_path), rnn_backend="auto"):
            with pytest.warns(loader.NativeKernelWarning, match="compiler"):
                text = jax.jit(lambda p, x: layer.apply(p, {}, x)[0]).lower(p, x).as_text()
            assert "fdl_gru" not in text
            assert not loader.status("rnn").loaded
            with config.override(rnn_backend="native"):
                with pytest.raises(RuntimeError, match="compiler"):
                    jax.jit(lambda p, x: layer.apply(p, {}, x)[0]).lower(p, x)
    finally:
        loader.reset()


def _transforms(layer, lengths):
    """jvp, jacfwd (wrt the input), jvp of grad (a Hessian-vector product) and grad of a loss of
    ``layer``'s outputs and final state, all in one jitted function."""

    def out(p, x, s0):
        y, s = layer.apply_with_state(p, x, s0, seq_lengths=lengths)
        return y, s

    def loss(p, x, s0):
        y, s = out(p, x, s0)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree_util.tree_leaves(s))

    def all_of(args, tangents):
        grad = jax.grad(loss, argnums=(0, 1, 2))
        return {"jvp": jax.jvp(out, args, tangents),
                "jacfwd": jax.jacfwd(lambda x: out(args[0], x, args[2])[0])(args[1]),
                "hvp": jax.jvp(lambda *a: grad(*a), args, tangents)[1],
                "grad": grad(*args)}

    return jax.jit(all_of), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("kind,bidirectional,with_lengths", [
    ("lstm", True, False),
    pytest.param("gru", False, False, marks=pytest.mark.slow),
    pytest.param("lstm", False, True, marks=pytest.mark.slow),
    pytest.param("gru", True, False, marks=pytest.mark.slow),
    pytest.param("lstm", False, False, marks=pytest.mark.slow)])
def test_fused_forward_mode_native_and_xla_equal_scan(kind, bidirectional, with_lengths, key):
    """Forward mode through the default (fused) path: jvp, jacfwd, jvp of grad and grad with
    the native loops (float32) and the XLA loops (float64) equal autodiff through scan_cell
    (float64); reverse mode still runs the native backward loop."""
    layers = {impl: MAKE[kind](3, bidirectional=bidirectional, impl=impl)
              for impl in ("fused", "scan")}
    _, p, _ = layers["fused"].init(key, (2, 4, 3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 3))
    s0 = jax.tree_util.tree_map(lambda a: a + 0.3, layers["fused"].initial_state(2))
    lengths = jnp.asarray([4, 2]) if with_lengths else None
    f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
    args = f64((p, x, s0))
    tangents = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), args)
    with config.override(rnn_backend="xla"):
        ref = _transforms(layers["scan"], lengths)[0](args, tangents)
        got = _transforms(layers["fused"], lengths)[0](args, tangents)
    _allclose(got, ref, rtol=1e-9, atol=1e-11)
    from fdl._ext import loader

    if not loader.load("rnn").loaded:
        return
    f32 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    with config.override(rnn_backend="native"):
        run, grad = _transforms(layers["fused"], lengths)
        got = run(f32(args), f32(tangents))
        text = grad.lower(*f32(args)).as_text()
    _allclose(got, ref, rtol=2e-3, atol=2e-4)
    assert (f"fdl_{kind}_bwd_dw" in text) == (lengths is None)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_native_gradients_are_deterministic(kind):
    """The native backward sums the weight gradients in fixed chunks added in a fixed order,
    whichever thread summed which chunk: the same call gives the same bits every time (fit's
    bitwise resume relies on it; it did not hold while the two threads split the steps by
    timing)."""
    _native_or_skip()
    layer = MAKE[kind](32)
    _, p, s = layer.init(jax.random.key(0), (64, 10, 64))
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    x = jax.random.normal(jax.random.key(1), (64, 10, 64), jnp.float32)
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, s, x)[0])), argnums=(0, 1)))
    first = jax.tree.map(np.asarray, f(p, x))
    for _ in range(5):
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(f(p, x)), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
