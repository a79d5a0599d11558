"""conv2d lowerings equal lax.conv_general_dilated (values, gradients, jit/grad/vmap), and the
XLA fallback when the native (oneDNN) library is unavailable or not eligible."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax import lax

from fdl import config
from fdl._ext import loader
from fdl.nn import conv_lowering
from fdl.nn.conv_lowering import conv2d_nhwc

TOL = dict(rtol=2e-4, atol=2e-4)


def _ref(x, w, stride, pad, dil=(1, 1), groups=1):
    # Reference in float64 (x64 is on in the test session), cast back: float32 XLA gradients
    # were seen to leave uninitialised values in input rows that no output reads.
    dtype = x.dtype
    return lax.conv_general_dilated(
        x.astype(jnp.float64), w.astype(jnp.float64), tuple(stride), tuple(pad),
        rhs_dilation=tuple(dil),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    ).astype(dtype)


def _has_custom_call(fn, *args) -> bool:
    return "fdl_conv_" in jax.jit(fn).lower(*args).as_text()


def _check_onednn_matches_lax(x, w, k, args):
    """The oneDNN path's values and input/kernel gradients equal ``lax``'s."""
    f = lambda x, w: conv2d_nhwc(x, w, *args)  # noqa: E731
    r = lambda x, w: _ref(x, w, *args)  # noqa: E731
    assert _has_custom_call(f, x, w)
    y = jax.jit(f)(x, w)
    _close(y, r(x, w), scale=float(jnp.abs(r(x, w)).max()))
    ct = jax.random.normal(k, y.shape, jnp.float32)
    loss = lambda fn: lambda x, w: jnp.vdot(fn(x, w), ct)  # noqa: E731
    got = jax.jit(jax.grad(loss(f), (0, 1)))(x, w)
    want = jax.grad(loss(r), (0, 1))(x, w)
    for a, b in zip(got, want):
        _close(a, b, scale=float(jnp.abs(b).max()))


def _close(a, b, scale=1.0):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=TOL["rtol"], atol=TOL["atol"] * max(scale, 1.0))


@pytest.fixture
def onednn():
    if not conv_lowering.native_available():
        pytest.skip(f"native convolution unavailable: {loader.status('conv').reason}")
    with config.override(conv_backend="native"):
        yield


def _data(key, xs, ws):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, xs, jnp.float32)
    w = jax.random.normal(k2, ws, jnp.float32)
    return x, w, k3


conv_cfg = st.fixed_dictionaries({
    "n": st.integers(1, 3), "h": st.integers(3, 9), "w": st.integers(3, 9),
    "cin_g": st.integers(1, 4), "cout_g": st.integers(1, 4), "groups": st.integers(1, 3),
    "kh": st.integers(1, 3), "kw": st.integers(1, 3),
    "stride": st.tuples(st.integers(1, 3), st.integers(1, 2)),
    "dil": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "pad": st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                     st.tuples(st.integers(0, 2), st.integers(0, 2))),
})


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=conv_cfg)
def test_onednn_matches_lax_values_and_grads(onednn, cfg):
    c = cfg
    oh = (c["h"] + sum(c["pad"][0]) - c["dil"][0] * (c["kh"] - 1) - 1) // c["stride"][0] + 1
    ow = (c["w"] + sum(c["pad"][1]) - c["dil"][1] * (c["kw"] - 1) - 1) // c["stride"][1] + 1
    assume(oh >= 1 and ow >= 1)
    g = c["groups"]
    x, w, k = _data(jax.random.key(0), (c["n"], c["h"], c["w"], c["cin_g"] * g),
                    (c["kh"], c["kw"], c["cin_g"], c["cout_g"] * g))
    args = (c["stride"], c["pad"], c["dil"], g)
    _check_onednn_matches_lax(x, w, k, args)


def test_onednn_second_order(onednn):
    x, w, _ = _data(jax.random.key(1), (2, 7, 6, 4), (3, 2, 2, 6))
    args = ((2, 1), ((1, 0), (0, 2)), (1, 2), 2)

    def h(conv):
        inner = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args))), 0)
        return jax.grad(lambda x, w: jnp.sum(inner(x, w) ** 2), (0, 1))

    got = jax.jit(h(conv2d_nhwc))(x, w)
    want = h(_ref)(x, w)
    for a, b in zip(got, want):
        _close(a, b, scale=float(jnp.abs(b).max()))


@pytest.mark.parametrize("axes", [(0, None), (None, 0), (0, 0)])
def test_onednn_vmap(onednn, axes):
    x, w, k = _data(jax.random.key(2), (3, 2, 6, 5, 4), (3, 3, 3, 4, 5))
    xs = x if axes[0] == 0 else x[0]
    ws = w if axes[1] == 0 else w[0]
    args = ((1, 2), ((1, 1), (0, 1)), (1, 1), 1)
    f = jax.vmap(lambda x, w: conv2d_nhwc(x, w, *args), axes)
    r = jax.vmap(lambda x, w: _ref(x, w, *args), axes)
    _close(jax.jit(f)(xs, ws), r(xs, ws), scale=10.0)
    # per-example gradients (vmap of grad) and grad of vmap
    ct = jax.random.normal(k, r(xs, ws).shape, jnp.float32)
    loss = lambda fn: lambda x, w: jnp.vdot(fn(x, w), ct)  # noqa: E731
    for a, b in zip(jax.jit(jax.grad(loss(f), (0, 1)))(xs, ws), jax.grad(loss(r), (0, 1))(xs, ws)):
        _close(a, b, scale=float(jnp.abs(b).max()))
    pe = lambda conv: jax.vmap(jax.grad(  # noqa: E731
        lambda x, w: jnp.sum(conv(x, w, *args) ** 2), (0, 1)), axes)
    for a, b in zip(jax.jit(pe(conv2d_nhwc))(xs, ws), pe(_ref)(xs, ws)):
        _close(a, b, scale=float(jnp.abs(b).max()))


def test_onednn_nested_vmap(onednn):
    # outer vmap: x and w batched (per-example kernels, loop); inner: w unbatched (folded into N)
    x, w, _ = _data(jax.random.key(3), (2, 3, 2, 5, 5, 3), (2, 2, 3, 3, 4))
    args = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    nested = lambda conv: jax.vmap(  # noqa: E731
        jax.vmap(lambda x, w: conv(x, w, *args), (0, None)), (0, 0))
    _close(jax.jit(nested(conv2d_nhwc))(x, w), nested(_ref)(x, w), scale=10.0)


def test_onednn_layer_integration(onednn, key):
    from fdl import nn as fnn

    layer = fnn.conv2d(5, 3, stride=2, padding=1)
    x = jax.random.normal(key, (2, 8, 8, 3), jnp.float32)
    _, params, state = layer.init(jax.random.key(7), x.shape)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    y, _ = jax.jit(lambda p, x: layer.apply(p, state, x))(params, x)
    want = _ref(x, params["w"], (2, 2), ((1, 1), (1, 1))) + params["b"]
    _close(y, want, scale=10.0)


def test_float64_and_xla_backend_use_lax(monkeypatch):
    x = jnp.ones((1, 5, 5, 2), jnp.float64)
    w = jnp.ones((3, 3, 2, 2), jnp.float64)
    args = ((1, 1), ((1, 1), (1, 1)))
    f = lambda x, w: conv2d_nhwc(x, w, *args)  # noqa: E731
    with config.override(conv_backend="native"):
        assert not _has_custom_call(f, x, w)  # float64: not eligible -> XLA
        np.testing.assert_allclose(f(x, w), _ref(x, w, *args))
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    with config.override(conv_backend="xla"):
        assert not _has_custom_call(f, x32, w32)
        np.testing.assert_allclose(f(x32, w32), _ref(x32, w32, *args), rtol=1e-6)
    monkeypatch.setenv("FDL_CONV_BACKEND", "xla")  # the environment variable as the default
    assert not _has_custom_call(f, x32, w32)


def test_bad_backend_name(monkeypatch):
    conv = lambda: conv2d_nhwc(jnp.ones((1, 3, 3, 1), jnp.float32),  # noqa: E731
                               jnp.ones((1, 1, 1, 1), jnp.float32), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=r"\['auto', 'native', 'xla'\]"):
        with config.override(conv_backend="cudnn"):
            pass
    monkeypatch.setenv("FDL_CONV_BACKEND", "onednn")
    with pytest.raises(ValueError, match="FDL_CONV_BACKEND"):
        conv()


@pytest.fixture
def no_native_library(monkeypatch, tmp_path):
    """A machine where the native convolution cannot be had: no installed build, an empty build
    cache, no C++ compiler. Restores the real library afterwards."""
    monkeypatch.setattr(loader, "installed_path", lambda name: tmp_path / "missing.so")
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    loader.reset()
    with config.override(native_cache=str(tmp_path / "cache"), conv_backend="auto"):
        yield
    loader.reset()


def test_fallback_when_native_unavailable(no_native_library):
    """No compiler/oneDNN: one warning naming what is missing and the fix, then XLA (values
    and gradients); ``native`` refuses with the same reason."""
    x = jax.random.normal(jax.random.key(4), (2, 6, 6, 3), jnp.float32)
    w = jax.random.normal(jax.random.key(5), (3, 3, 3, 4), jnp.float32)
    args = ((1, 1), ((1, 1), (1, 1)))
    f = lambda x, w: conv2d_nhwc(x, w, *args)  # noqa: E731
    with pytest.warns(loader.NativeKernelWarning, match="compiler.*Fix: install") as record:
        assert not _has_custom_call(f, x, w)
        assert not _has_custom_call(lambda x, w: f(x, w) + 1, x, w)
    assert len(record) == 1  # once, not per trace
    assert not loader.status("conv").loaded
    _close(jax.jit(f)(x, w), _ref(x, w, *args), scale=10.0)
    g = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)
    for a, b in zip(g, jax.grad(lambda x, w: jnp.sum(_ref(x, w, *args) ** 2), (0, 1))(x, w)):
        _close(a, b, scale=float(jnp.abs(b).max()))
    with config.override(conv_backend="native"):  # (a new function: jit caches traces)
        with pytest.raises(RuntimeError, match="compiler"):
            jax.jit(lambda x, w: conv2d_nhwc(x, w, *args)).lower(x, w)


# --- geometries with their own paths (negative padding, oneDNN's implementation choice) --------

# (x shape, w shape, stride, padding, dilation, groups); the comment names the path.
GEOMETRY_CASES = [
    ((2, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # bwd-data: brg_fwd
    ((2, 9, 7, 8), (3, 3, 8, 16), (1, 1), ((0, 2), (2, 1)), (1, 1), 1),  # asymmetric pad
    ((2, 6, 6, 8), (3, 2, 8, 8), (1, 1), ((3, 0), (1, 1)), (1, 1), 1),  # pad > k-1
    ((2, 4, 4, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # <=16 px: jit fwd
    ((2, 9, 9, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),  # 1x1/2, neg. pad
    ((2, 8, 8, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),  # 1x1/2, even size
    ((2, 8, 9, 8), (3, 3, 8, 16), (2, 3), ((0, 0), (1, 0)), (1, 1), 1),  # 3x3/2, neg. pad
    ((1, 10, 9, 4), (2, 3, 4, 5), (3, 2), ((1, 0), (0, 0)), (2, 1), 1),  # dilated, neg. pad
    ((2, 8, 8, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # 3-ch stem: jit fwd
    ((2, 8, 8, 8), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),  # groups
    ((1, 7, 6, 4), (2, 3, 4, 5), (1, 1), ((1, 0), (2, 2)), (2, 1), 1),  # dilation
]


@pytest.mark.parametrize("case", range(len(GEOMETRY_CASES)))
def test_geometry_paths_match_lax(onednn, case):
    xs, ws, stride, pad, dil, g = GEOMETRY_CASES[case]
    x, w, k = _data(jax.random.key(10 + case), xs, ws)
    args = (stride, pad, dil, g)
    _check_onednn_matches_lax(x, w, k, args)
    if case in (0, 1, 4):
        # second order through the backward pass, and per-example gradients (vmap)
        def h(conv):
            inner = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args))), 0)
            return jax.grad(lambda x, w: jnp.sum(inner(x, w) ** 2), (0, 1))

        for a, b in zip(jax.jit(h(conv2d_nhwc))(x, w), h(_ref)(x, w)):
            _close(a, b, scale=float(jnp.abs(b).max()))
        pe = lambda conv: jax.vmap(jax.grad(  # noqa: E731
            lambda x, w: jnp.sum(conv(x[None], w, *args) ** 2), (0, 1)), (0, None))
        for a, b in zip(jax.jit(pe(conv2d_nhwc))(x, w), pe(_ref)(x, w)):
            _close(a, b, scale=float(jnp.abs(b).max()))


def test_picks_documented_implementations(onednn):
    """On AVX-512 CPUs the native library picks the implementations docs/performance.md
    names."""
    import ctypes

    lib = loader.library("conv")
    lib.fdl_conv_onednn_impl.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                                         ctypes.c_char_p, ctypes.c_int]

    def impl(kind, n, ih, ic, oh, oc, k, s, p):
        geom = (ctypes.c_int64 * 18)(n, ih, ih, ic, oh, oh, oc, k, k, s, s, p, p, p, p, 1, 1, 1)
        buf = ctypes.create_string_buffer(200)
        assert lib.fdl_conv_onednn_impl(kind, geom, buf, 200) == 0, buf.value
        return buf.value.decode()

    if "avx512" not in impl(0, 2, 8, 16, 8, 32, 3, 1, 1):
        pytest.skip("not an AVX-512 CPU: implementation names differ")
    assert impl(0, 2, 4, 64, 4, 64, 3, 1, 1).startswith("jit:avx512_core")  # 16 px
    assert impl(0, 2, 8, 3, 8, 16, 3, 1, 1).startswith("jit:avx512_core")  # 3 channels
    assert impl(0, 2, 8, 16, 8, 64, 3, 1, 1).startswith("brgconv")  # everything else
    assert impl(1, 2, 8, 16, 8, 64, 3, 1, 1).startswith("brg_fwd")  # bwd-data, stride 1
    assert impl(2, 2, 9, 16, 5, 32, 1, 2, 0).startswith("jit")  # 1x1 bwd-w: direct
    assert impl(0, 2, 8, 16, 8, 64, 3, 1, 1).endswith("(no reorder)")  # Acdb64a == HWIO
