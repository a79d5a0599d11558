"""Pooling layers: init/apply shape agreement, equality with PyTorch, the reshape fast path
against ``lax.reduce_window`` (values and gradients), float64 gradient checks, bad input."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl import nn
from fdl.nn import ShapeError
from fdl.nn.pool import avg_pool_nhwc, max_pool_nhwc

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _nchw(x):
    return torch.tensor(np.asarray(x, np.float64)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def _distinct(shape, seed):
    """Values with no ties (spacing 0.1 >> finite-difference steps), shuffled."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    return (rng.permutation(n).astype(np.float64) * 0.1 - 0.05 * n).reshape(shape)


def _abstract_init_apply(layer, shape):
    box = {}

    def run(k):
        out, params, state = layer.init(k, shape)
        box["out"] = out
        return layer.apply(params, state, jnp.zeros(shape, jnp.float32))[0]

    y = jax.eval_shape(run, jax.random.key(0))
    return box["out"], tuple(y.shape)


def check_layer_gradients_jit(layer, x, order=1):
    _, params, state = layer.init(jax.random.key(0), tuple(x.shape))
    f = jax.jit(lambda xx: layer.apply(params, state, xx)[0])
    ft.check_gradients(f, (jnp.asarray(x, jnp.float64),), order=order)


@st.composite
def pool2d_cases(draw):
    k = _pair(draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))))
    stride = draw(st.one_of(st.none(), st.integers(1, 3),
                            st.tuples(st.integers(1, 3), st.integers(1, 3))))
    pad = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7)),
             draw(st.integers(1, 3)))
    return dict(k=k, stride=stride, pad=pad, shape=shape,
                kind=draw(st.sampled_from(["max", "avg", "avg_nopad"])))


def _make_pool(c):
    if c["kind"] == "max":
        return nn.max_pool2d(c["k"], c["stride"], c["pad"])
    return nn.avg_pool2d(c["k"], c["stride"], c["pad"], count_include_pad=c["kind"] == "avg")


def _expected(c):
    st_ = c["k"] if c["stride"] is None else _pair(c["stride"])
    return [(c["shape"][1 + i] + 2 * c["pad"][i] - c["k"][i]) // st_[i] + 1 for i in range(2)]


# ----------------------------------------------------------------------------- shapes / torch


@settings(max_examples=40)
@given(c=pool2d_cases())
def test_pool2d_init_apply_shape_agreement(c):
    layer = _make_pool(c)
    expect = _expected(c)
    if min(expect) <= 0:
        with pytest.raises(ShapeError, match="size would be <= 0"):
            layer.init(jax.random.key(0), c["shape"])
        return
    out, y_shape = _abstract_init_apply(layer, c["shape"])
    assert out == y_shape == (c["shape"][0], *expect, c["shape"][3])


@settings(max_examples=10)
@given(c=pool2d_cases(), seed=st.integers(0, 1000))
def test_pool2d_equals_torch(c, seed):
    assume(min(_expected(c)) > 0)
    x = np.random.default_rng(seed).normal(size=c["shape"])
    layer = _make_pool(c)
    out, _, _ = layer.init(jax.random.key(0), x.shape)
    y, _ = layer.apply({}, {}, jnp.asarray(x))
    assert y.shape == out
    stride = c["stride"] if c["stride"] is not None else None
    if c["kind"] == "max":
        ref = F.max_pool2d(_nchw(x), c["k"], stride, c["pad"])
    else:
        ref = F.avg_pool2d(_nchw(x), c["k"], stride, c["pad"],
                           count_include_pad=c["kind"] == "avg")
    np.testing.assert_allclose(np.asarray(y), _nhwc(ref), rtol=1e-12, atol=1e-12)


def test_max_pool_pads_with_minus_inf():
    """All-negative input with padding: the pad never wins (PyTorch semantics)."""
    x = -1.0 - np.random.default_rng(0).random((1, 4, 4, 2))
    y, _ = nn.max_pool2d(3, 2, 1).apply({}, {}, jnp.asarray(x))
    assert np.all(np.asarray(y) < -1.0)
    np.testing.assert_allclose(np.asarray(y), _nhwc(F.max_pool2d(_nchw(x), 3, 2, 1)))


def test_avg_pool_count_include_pad():
    x = np.ones((1, 3, 3, 1))
    y_in, _ = nn.avg_pool2d(3, 1, 1, count_include_pad=True).apply({}, {}, jnp.asarray(x))
    y_ex, _ = nn.avg_pool2d(3, 1, 1, count_include_pad=False).apply({}, {}, jnp.asarray(x))
    assert float(y_in[0, 0, 0, 0]) == pytest.approx(4 / 9)  # corner: 4 real of 9
    assert float(y_in[0, 1, 1, 0]) == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(y_ex), 1.0)


@pytest.mark.parametrize("kind", ["max", "avg", "avg_nopad"])
@settings(max_examples=4)
@given(length=st.integers(2, 9), k=st.integers(1, 3), stride=st.one_of(st.none(),
       st.integers(1, 3)), pad_frac=st.integers(0, 1), seed=st.integers(0, 100))
def test_pool1d_equals_torch(kind, length, k, stride, pad_frac, seed):
    pad = pad_frac * (k // 2)
    assume(length + 2 * pad >= k)
    x = np.random.default_rng(seed).normal(size=(2, length, 3))
    if kind == "max":
        layer = nn.max_pool1d(k, stride, pad)
        ref = F.max_pool1d(torch.tensor(x).permute(0, 2, 1), k, stride, pad)
    else:
        layer = nn.avg_pool1d(k, stride, pad, count_include_pad=kind == "avg")
        ref = F.avg_pool1d(torch.tensor(x).permute(0, 2, 1), k, stride, pad,
                           count_include_pad=kind == "avg")
    out, _, _ = layer.init(jax.random.key(0), x.shape)
    y, _ = layer.apply({}, {}, jnp.asarray(x))
    assert out == y.shape
    np.testing.assert_allclose(np.asarray(y), ref.permute(0, 2, 1).numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    "in_hw, out_size",
    [((7, 5), (3, 2)), ((6, 6), 3), ((5, 9), (5, 4)), ((4, 7), (None, 3)), ((3, 2), (5, 4)),
     ((8, 8), 1)],
)
def test_adaptive_avg_pool2d_equals_torch(in_hw, out_size):
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 3))
    layer = nn.adaptive_avg_pool2d(out_size)
    out, _, _ = layer.init(jax.random.key(0), x.shape)
    y, _ = layer.apply({}, {}, jnp.asarray(x))
    assert out == y.shape
    ref = F.adaptive_avg_pool2d(_nchw(x), out_size)
    np.testing.assert_allclose(np.asarray(y), _nhwc(ref), rtol=1e-12, atol=1e-12)


def test_global_avg_pool2d():
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 4))
    layer = nn.global_avg_pool2d()
    out, _, _ = layer.init(jax.random.key(0), x.shape)
    y, _ = layer.apply({}, {}, jnp.asarray(x))
    assert out == y.shape == (2, 4)
    ref = F.adaptive_avg_pool2d(_nchw(x), 1)[:, :, 0, 0].numpy()
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12)


# ----------------------------------------------------------------------------- fast path


@pytest.mark.parametrize(
    "shape, k, stride, pads",
    [
        ((2, 6, 4, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),  # reshape path
        ((1, 7, 8, 2), (3, 2), (3, 2), ((0, 0), (0, 0))),  # reshape path, cropped rows
        ((1, 7, 8, 2), (3, 3), (2, 2), ((1, 1), (0, 1))),  # max: strided-slices path
    ],
)
@pytest.mark.parametrize("pool", [max_pool_nhwc, avg_pool_nhwc])
def test_fast_path_equals_reduce_window(pool, shape, k, stride, pads):
    """The fast paths (reshape + max/mean; max of strided slices) equal lax.reduce_window in
    value and gradient (inputs without ties)."""
    x = jnp.asarray(_distinct(shape, 1))
    r = jnp.asarray(np.random.default_rng(2).normal(
        size=jax.eval_shape(lambda v: pool(v, k, stride, pads), x).shape))

    def loss(v, fast):
        return jnp.sum(pool(v, k, stride, pads, fast=fast) * r)

    np.testing.assert_allclose(np.asarray(pool(x, k, stride, pads, fast=True)),
                               np.asarray(pool(x, k, stride, pads, fast=False)), rtol=1e-12)
    g_fast = jax.grad(loss)(x, True)
    g_slow = jax.grad(loss)(x, False)
    np.testing.assert_allclose(np.asarray(g_fast), np.asarray(g_slow), rtol=1e-12, atol=1e-12)


def _primitives(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)

    def walk(jp):
        for eqn in jp.eqns:
            yield eqn.primitive.name
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)

    return set(walk(jaxpr.jaxpr))


def test_fast_path_is_used_for_kernel_equal_stride():
    """The 2x2/2 max-pool's forward and gradient contain no reduce_window/select-and-scatter
    (the slow CPU path of ANCHORS.md); an overlapping pool does use reduce_window."""
    x = jnp.ones((2, 8, 8, 3), jnp.float32)
    layer = nn.max_pool2d(2)
    g = jax.grad(lambda v: jnp.sum(layer.apply({}, {}, v)[0]))
    prims = _primitives(g, x)
    assert not any("reduce_window" in p or "select_and_scatter" in p for p in prims), prims
    g = jax.grad(lambda v: jnp.sum(nn.max_pool2d(3, 2, 1).apply({}, {}, v)[0]))
    prims = _primitives(g, x)  # overlapping 3x3/2: max of strided slices
    assert not any("reduce_window" in p or "select_and_scatter" in p for p in prims), prims
    g = jax.grad(lambda v: jnp.sum(max_pool_nhwc(v, (3, 3), (2, 2), ((0, 0), (0, 0)),
                                                 fast=False)))
    prims = _primitives(g, x)
    assert any("reduce_window" in p or "select_and_scatter" in p for p in prims), prims
    g = jax.grad(lambda v: jnp.sum(nn.max_pool2d(5, 1).apply({}, {}, v)[0]))  # 25 taps
    assert any("reduce_window" in p or "select_and_scatter" in p for p in _primitives(g, x))


@pytest.mark.parametrize("make", [lambda: nn.max_pool2d(3, 2, 1), lambda: nn.avg_pool2d(3, 2, 1),
                                  lambda: nn.avg_pool2d(3, 2, 1, count_include_pad=False)])
def test_reduce_window_pool_differentiable_under_jit_float32(make):
    """Regression: the reduce_window path must differentiate under jit in float32 (a traced
    init value makes reduce_window a generic, non-differentiable reduction)."""
    layer = make()
    x = jnp.asarray(_distinct((2, 6, 6, 2), 0), jnp.float32)
    g = jax.jit(jax.grad(lambda v: jnp.sum(layer.apply({}, {}, v)[0] ** 2)))(x)
    g64 = jax.grad(lambda v: jnp.sum(layer.apply({}, {}, v)[0] ** 2))(x.astype(jnp.float64))
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(g64), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: nn.max_pool2d(2), (1, 4, 5, 2)),  # fast path (with a cropped column)
        (lambda: nn.max_pool2d(3, 2, 1), (1, 5, 5, 2)),  # strided slices, -inf padding
        (lambda: nn.max_pool2d(5, 2, 2), (1, 6, 5, 1)),  # reduce_window (25 taps)
        (lambda: nn.avg_pool2d(2), (1, 4, 4, 2)),
        (lambda: nn.avg_pool2d((3, 2), (2, 1), (1, 1), count_include_pad=False), (1, 5, 4, 1)),
        (lambda: nn.max_pool1d(3, 2, 1), (2, 7, 2)),
        (lambda: nn.avg_pool1d(2), (2, 6, 2)),
        (lambda: nn.global_avg_pool2d(), (2, 3, 3, 2)),
        (lambda: nn.adaptive_avg_pool2d((2, 3)), (1, 5, 7, 2)),
    ],
)
@settings(max_examples=2)
@given(seed=st.integers(0, 2**16))
def test_pool_gradients(layer, shape, seed):
    check_layer_gradients_jit(layer(), _distinct(shape, seed))


def test_pool_gradients_with_fdl_testing():
    """The same through fdl.testing.check_layer_gradients (eager, dense coordinate check)."""
    x = _distinct((1, 4, 4, 2), 3)
    ft.check_layer_gradients(nn.max_pool2d(2), x, key=jax.random.key(0), wrt=("x",))
    ft.check_layer_gradients(nn.avg_pool2d(3, 1, 1), x, key=jax.random.key(1), wrt=("x",))


# ----------------------------------------------------------------------------- bad input


def test_pool_bad_rank():
    with pytest.raises(ShapeError, match=r"max_pool2d.*rank 4.*got shape \(8, 8, 3\)"):
        nn.max_pool2d(2).init(jax.random.key(0), (8, 8, 3))
    with pytest.raises(ShapeError, match=r"avg_pool2d.*rank 4"):
        nn.avg_pool2d(2).apply({}, {}, jnp.ones((8, 8, 3)))
    with pytest.raises(ShapeError, match=r"max_pool1d.*rank 3 \(N, L, C\)"):
        nn.max_pool1d(2).init(jax.random.key(0), (1, 8, 8, 3))
    with pytest.raises(ShapeError, match=r"global_avg_pool2d.*rank 4"):
        nn.global_avg_pool2d().init(jax.random.key(0), (2, 3))
    with pytest.raises(ShapeError, match=r"adaptive_avg_pool2d.*rank 4"):
        nn.adaptive_avg_pool2d(2).apply({}, {}, jnp.ones((4, 4, 3)))


def test_pool_output_size_zero_names_path():
    net = nn.serial(("c", nn.conv2d(2, 3)), ("pool", nn.max_pool2d(4)))
    with pytest.raises(ShapeError) as e:
        net.init(jax.random.key(0), (1, 5, 5, 1))
    msg = str(e.value)
    assert "'pool'" in msg and "max_pool2d" in msg and "would be <= 0" in msg
    with pytest.raises(ShapeError, match="avg_pool1d.*output length size would be <= 0"):
        nn.avg_pool1d(5).init(jax.random.key(0), (1, 3, 2))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.max_pool2d(0), r"max_pool2d: kernel_size must be an integer >= 1, got 0"),
        (lambda: nn.max_pool2d(-2), r"kernel_size must be an integer >= 1, got -2"),
        (lambda: nn.avg_pool2d(2, stride=0), r"avg_pool2d: stride must be an integer >= 1"),
        (lambda: nn.max_pool2d(3, padding=-1), r"padding must be >= 0"),
        (lambda: nn.max_pool2d(3, padding=2), r"at most half the kernel size"),
        (lambda: nn.avg_pool1d(2, padding=2), r"avg_pool1d: padding must be at most half"),
        (lambda: nn.max_pool2d(2, padding="same"), r"padding must be an int"),
        (lambda: nn.adaptive_avg_pool2d(0), r"output_size entries must be integers >= 1"),
        (lambda: nn.adaptive_avg_pool2d((2, 3, 4)), r"output_size must be an int or \(oh, ow\)"),
    ],
)
def test_pool_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()
