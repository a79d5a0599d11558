"""conv1d / conv2d / conv_transpose2d: init/apply shape agreement, equality with PyTorch,
float64 gradient checks and bad-input messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl import nn
from fdl.nn import ShapeError

torch = pytest.importorskip("torch")
F = torch.nn.functional


# ----------------------------------------------------------------------------- helpers


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _init_apply(layer, x, seed=0):
    out_shape, params, state = layer.init(jax.random.key(seed), tuple(x.shape))
    y, new_state = layer.apply(params, state, jnp.asarray(x))
    return out_shape, params, y, new_state


def _nchw(x):
    return torch.tensor(np.asarray(x, np.float64)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def _hwio_to_oihw(w):
    return torch.tensor(np.asarray(w, np.float64)).permute(3, 2, 0, 1)


def _tf_same_pads(size, k, s, d):
    """TensorFlow's documented SAME rule (independent of fdl's formula)."""
    k_eff = d * (k - 1) + 1
    total = max(k_eff - (s if size % s == 0 else size % s), 0)
    return total // 2, total - total // 2


def _torch_conv2d(x, w, b, stride, padding, dilation, groups):
    """PyTorch reference on NHWC/HWIO float64 arrays; padding in any fdl form."""
    xt = _nchw(x)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    kh, kw = w.shape[:2]
    if padding == "same" and (sh, sw) == (1, 1):
        tpad = "same"
    else:
        if padding == "same":
            (t, bo), (le, r) = (_tf_same_pads(x.shape[1], kh, sh, dh),
                                _tf_same_pads(x.shape[2], kw, sw, dw))
        elif padding == "valid":
            (t, bo), (le, r) = (0, 0), (0, 0)
        elif isinstance(padding, int):
            (t, bo), (le, r) = (padding, padding), (padding, padding)
        elif isinstance(padding[0], int):
            (t, bo), (le, r) = (padding[0],) * 2, (padding[1],) * 2
        else:
            (t, bo), (le, r) = padding
        xt = F.pad(xt, (le, r, t, bo))
        tpad = 0
    bt = None if b is None else torch.tensor(np.asarray(b, np.float64))
    y = F.conv2d(xt, _hwio_to_oihw(w), bt, stride=(sh, sw), padding=tpad, dilation=(dh, dw),
                 groups=groups)
    return _nhwc(y)


def _expected_len(size, k, s, pads, d):
    return (size + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def _pads_of(padding, x_shape, ks, st_, dl):
    if padding == "valid":
        return [(0, 0), (0, 0)]
    if padding == "same":
        return [_tf_same_pads(x_shape[1 + i], ks[i], st_[i], dl[i]) for i in range(2)]
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    if isinstance(padding[0], int):
        return [(padding[0],) * 2, (padding[1],) * 2]
    return [tuple(p) for p in padding]


small = st.integers(0, 2)
pad_strategy = st.one_of(
    small,
    st.tuples(small, small),
    st.tuples(st.tuples(small, small), st.tuples(small, small)),
    st.sampled_from(["same", "valid"]),
)
int_or_pair = lambda lo, hi: st.one_of(  # noqa: E731
    st.integers(lo, hi), st.tuples(st.integers(lo, hi), st.integers(lo, hi))
)


@st.composite
def conv2d_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    return dict(
        shape=(draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8)), cin),
        cout=cout,
        kernel=draw(int_or_pair(1, 3)),
        stride=draw(int_or_pair(1, 3)),
        padding=draw(pad_strategy),
        dilation=draw(int_or_pair(1, 2)),
        groups=groups,
        use_bias=draw(st.booleans()),
    )


# ----------------------------------------------------------------------------- conv2d


def _conv2d_layer(case):
    return nn.conv2d(case["cout"], case["kernel"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                     use_bias=case["use_bias"], b_init=nn.initializers.normal(1.0))


def _conv2d_expected(case):
    ks, st_, dl = _pair(case["kernel"]), _pair(case["stride"]), _pair(case["dilation"])
    shape = case["shape"]
    pads = _pads_of(case["padding"], shape, ks, st_, dl)
    return [_expected_len(shape[1 + i], ks[i], st_[i], pads[i], dl[i]) for i in range(2)]


def _abstract_init_apply(layer, shape, seed=0):
    """``(init's out_shape, params shapes, apply's out shape)`` by abstract evaluation of
    both ``init`` and ``apply`` (no compilation, so many drawn shapes stay cheap)."""
    box = {}

    def run(k):
        out, params, state = layer.init(k, shape)
        box["out"] = out
        y, _ = layer.apply(params, state, jnp.zeros(shape, jnp.float32))
        return params, y

    params, y = jax.eval_shape(run, jax.random.key(seed))
    return box["out"], params, tuple(y.shape)


@settings(max_examples=40)
@given(case=conv2d_cases(), seed=st.integers(0, 2**16))
def test_conv2d_init_apply_shape_agreement(case, seed):
    """init's predicted shape == apply's == PyTorch's formula; an empty output is refused."""
    layer = _conv2d_layer(case)
    shape, expect = case["shape"], _conv2d_expected(case)
    if min(expect) <= 0:
        with pytest.raises(ShapeError, match="size would be <= 0"):
            layer.init(jax.random.key(seed), shape)
        return
    out_shape, params, y_shape = _abstract_init_apply(layer, shape, seed)
    assert out_shape == (shape[0], *expect, case["cout"])
    assert y_shape == out_shape
    ks = _pair(case["kernel"])
    assert params["w"].shape == (*ks, shape[3] // case["groups"], case["cout"])
    assert ("b" in params) == case["use_bias"]


@settings(max_examples=5)
@given(case=conv2d_cases(), seed=st.integers(0, 2**16))
def test_conv2d_equals_torch(case, seed):
    """Values equal torch.nn.functional.conv2d (float64), over drawn stride/padding/dilation/
    groups."""
    assume(min(_conv2d_expected(case)) > 0)
    layer = _conv2d_layer(case)
    x = np.random.default_rng(seed).normal(size=case["shape"])
    out_shape, params, y, _ = _init_apply(layer, x, seed)
    assert y.shape == out_shape
    ref = _torch_conv2d(x, params["w"], params.get("b"), case["stride"], case["padding"],
                        case["dilation"], case["groups"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=2, padding=1),
        dict(groups=4),  # depthwise: groups == in_channels
        dict(groups=2, stride=2, padding=((1, 0), (0, 2))),
    ],
)
def test_conv2d_equals_torch_float32(kw):
    x = np.random.default_rng(0).normal(size=(2, 11, 10, 4)).astype(np.float32)
    cout = 8
    layer = nn.conv2d(cout, 3, **kw, b_init=nn.initializers.normal(1.0))
    out_shape, params, y, _ = _init_apply(layer, jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.float32 and params["w"].dtype == jnp.float32
    assert y.shape == out_shape
    ref = _torch_conv2d(x, params["w"], params["b"], kw.get("stride", 1), kw.get("padding", 0),
                        kw.get("dilation", 1), kw.get("groups", 1))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_conv2d_same_keeps_size_and_tf_rule_for_stride():
    shape = (1, 7, 8, 2)
    for k in (1, 2, 3, 4, 5):
        layer = nn.conv2d(3, k, padding="same")
        out, _, y_shape = _abstract_init_apply(layer, shape)
        assert out == y_shape == (1, 7, 8, 3)
    for s in (2, 3):
        layer = nn.conv2d(3, 3, stride=s, padding="same")
        out, _, y_shape = _abstract_init_apply(layer, shape)
        assert out == y_shape == (1, math.ceil(7 / s), math.ceil(8 / s), 3)


def test_conv2d_default_init_is_pytorch_uniform():
    """w ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in/groups * kh * kw; bias zeros."""
    layer = nn.conv2d(64, 3, groups=2)
    _, params, _ = layer.init(jax.random.key(1), (1, 8, 8, 16))
    w = np.asarray(params["w"])
    bound = 1 / math.sqrt(8 * 3 * 3)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.1)
    assert np.all(np.asarray(params["b"]) == 0)
    # the same as torch's kaiming_uniform_(a=sqrt(5)) bound
    tw = torch.empty(64, 8, 3, 3)
    torch.nn.init.kaiming_uniform_(tw, a=math.sqrt(5))
    assert tw.abs().max().item() <= bound + 1e-7


def test_conv2d_custom_initializers_and_dtype():
    layer = nn.conv2d(4, 2, w_init=nn.initializers.ones, b_init=nn.initializers.constant(0.5),
                      dtype=jnp.float64)
    _, params, _ = layer.init(jax.random.key(0), (1, 3, 3, 2))
    assert params["w"].dtype == jnp.float64
    y, _ = layer.apply(params, {}, jnp.ones((1, 3, 3, 2)))
    np.testing.assert_allclose(np.asarray(y), 2 * 2 * 2 + 0.5)


def test_conv2d_jit_and_deterministic_init():
    layer = nn.conv2d(5, 3, padding=1)
    _, p1, _ = layer.init(jax.random.key(3), (2, 6, 6, 3))
    _, p2, _ = layer.init(jax.random.key(3), (2, 6, 6, 3))
    _, p3, _ = layer.init(jax.random.key(4), (2, 6, 6, 3))
    np.testing.assert_array_equal(np.asarray(p1["w"]), np.asarray(p2["w"]))
    assert not np.allclose(np.asarray(p1["w"]), np.asarray(p3["w"]))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    y_eager, _ = layer.apply(p1, {}, x)
    y_jit, _ = jax.jit(lambda p, x: layer.apply(p, {}, x))(p1, x)
    np.testing.assert_allclose(np.asarray(y_eager), np.asarray(y_jit), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- conv1d


@st.composite
def conv1d_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    return dict(
        n=draw(st.integers(1, 2)), length=draw(st.integers(1, 10)), groups=groups,
        cin=2 * groups, cout=groups * draw(st.integers(1, 2)), k=draw(st.integers(1, 4)),
        stride=draw(st.integers(1, 3)), dilation=draw(st.integers(1, 2)),
        padding=draw(st.one_of(small, st.tuples(small, small),
                               st.sampled_from(["same", "valid"]))),
    )


def _conv1d_pads(c):
    padding = c["padding"]
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return _tf_same_pads(c["length"], c["k"], c["stride"], c["dilation"])
    if isinstance(padding, int):
        return (padding, padding)
    return padding


def _conv1d_layer(c):
    return nn.conv1d(c["cout"], c["k"], stride=c["stride"], padding=c["padding"],
                     dilation=c["dilation"], groups=c["groups"],
                     b_init=nn.initializers.normal(1.0))


@settings(max_examples=30)
@given(c=conv1d_cases(), seed=st.integers(0, 1000))
def test_conv1d_init_apply_shape_agreement(c, seed):
    layer = _conv1d_layer(c)
    expect = _expected_len(c["length"], c["k"], c["stride"], _conv1d_pads(c), c["dilation"])
    shape = (c["n"], c["length"], c["cin"])
    if expect <= 0:
        with pytest.raises(ShapeError, match="output length size would be <= 0"):
            layer.init(jax.random.key(seed), shape)
        return
    out_shape, params, y_shape = _abstract_init_apply(layer, shape, seed)
    assert out_shape == y_shape == (c["n"], expect, c["cout"])
    assert params["w"].shape == (c["k"], c["cin"] // c["groups"], c["cout"])


@settings(max_examples=6)
@given(c=conv1d_cases(), seed=st.integers(0, 1000))
def test_conv1d_equals_torch(c, seed):
    pads = _conv1d_pads(c)
    assume(_expected_len(c["length"], c["k"], c["stride"], pads, c["dilation"]) > 0)
    x = np.random.default_rng(seed).normal(size=(c["n"], c["length"], c["cin"]))
    out_shape, params, y, _ = _init_apply(_conv1d_layer(c), x, seed)
    assert out_shape == y.shape
    xt = F.pad(torch.tensor(x).permute(0, 2, 1), tuple(pads))
    wt = torch.tensor(np.asarray(params["w"], np.float64)).permute(2, 1, 0)
    ref = F.conv1d(xt, wt, torch.tensor(np.asarray(params["b"], np.float64)),
                   stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    np.testing.assert_allclose(np.asarray(y), ref.permute(0, 2, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_conv1d_same_matches_torch_same():
    x = np.random.default_rng(1).normal(size=(2, 9, 3))
    for k, d in [(4, 1), (3, 2)]:
        layer = nn.conv1d(4, k, padding="same", dilation=d)
        out_shape, params, y, _ = _init_apply(layer, x)
        assert out_shape == y.shape == (2, 9, 4)
        wt = torch.tensor(np.asarray(params["w"], np.float64)).permute(2, 1, 0)
        ref = F.conv1d(torch.tensor(x).permute(0, 2, 1), wt, padding="same", dilation=d)
        np.testing.assert_allclose(np.asarray(y), ref.permute(0, 2, 1).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- transpose


@st.composite
def tconv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    c = dict(
        n=draw(st.integers(1, 2)), h=draw(st.integers(1, 6)), w=draw(st.integers(1, 6)),
        groups=groups, cin=2 * groups, cout=3 * groups, ks=_pair(draw(int_or_pair(1, 4))),
        st=_pair(draw(int_or_pair(1, 3))), pd=_pair(draw(int_or_pair(0, 2))),
        dl=_pair(draw(int_or_pair(1, 2))),
    )
    # output_padding must be < max(stride, dilation): draw it below that bound
    c["op"] = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(c["st"], c["dl"]))
    c["expect"] = [
        (size - 1) * c["st"][i] - 2 * c["pd"][i] + c["dl"][i] * (c["ks"][i] - 1) + c["op"][i] + 1
        for i, size in enumerate((c["h"], c["w"]))
    ]
    return c


def _tconv_layer(c):
    return nn.conv_transpose2d(c["cout"], c["ks"], stride=c["st"], padding=c["pd"],
                               output_padding=c["op"], dilation=c["dl"], groups=c["groups"],
                               b_init=nn.initializers.normal(1.0))


@settings(max_examples=30)
@given(c=tconv_cases(), seed=st.integers(0, 1000))
def test_conv_transpose2d_init_apply_shape_agreement(c, seed):
    layer = _tconv_layer(c)
    shape = (c["n"], c["h"], c["w"], c["cin"])
    if min(c["expect"]) <= 0:
        with pytest.raises(ShapeError, match="size would be <= 0"):
            layer.init(jax.random.key(seed), shape)
        return
    out_shape, params, y_shape = _abstract_init_apply(layer, shape, seed)
    assert out_shape == y_shape == (c["n"], *c["expect"], c["cout"])
    assert params["w"].shape == (*c["ks"], c["cin"], c["cout"] // c["groups"])


@settings(max_examples=4)
@given(c=tconv_cases(), seed=st.integers(0, 1000))
def test_conv_transpose2d_equals_torch(c, seed):
    assume(min(c["expect"]) > 0)
    x = np.random.default_rng(seed).normal(size=(c["n"], c["h"], c["w"], c["cin"]))
    out_shape, params, y, _ = _init_apply(_tconv_layer(c), x, seed)
    assert out_shape == y.shape
    # documented mapping: torch weight (in, out/groups, kh, kw) == w.permute(2, 3, 0, 1)
    wt = torch.tensor(np.asarray(params["w"], np.float64)).permute(2, 3, 0, 1)
    ref = F.conv_transpose2d(_nchw(x), wt, torch.tensor(np.asarray(params["b"], np.float64)),
                             stride=c["st"], padding=c["pd"], output_padding=c["op"],
                             groups=c["groups"], dilation=c["dl"])
    np.testing.assert_allclose(np.asarray(y), _nhwc(ref), rtol=1e-5, atol=1e-5)


def test_conv_transpose2d_loads_torch_module_weights():
    m = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    m = m.double()
    layer = nn.conv_transpose2d(6, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = np.random.default_rng(2).normal(size=(2, 5, 4, 4))
    _, params, _ = layer.init(jax.random.key(0), x.shape)
    params = {"w": jnp.asarray(m.weight.detach().permute(2, 3, 0, 1).numpy()),
              "b": jnp.asarray(m.bias.detach().numpy())}
    y, _ = layer.apply(params, {}, jnp.asarray(x))
    ref = m(_nchw(x)).detach()
    assert y.shape == (2, 10, 8, 6)
    np.testing.assert_allclose(np.asarray(y), _nhwc(ref), rtol=1e-6, atol=1e-6)


def test_conv_transpose2d_default_init_is_pytorch_bound():
    layer = nn.conv_transpose2d(8, 3, groups=2)
    _, params, _ = layer.init(jax.random.key(0), (1, 4, 4, 6))
    bound = 1 / math.sqrt((8 // 2) * 9)  # PyTorch's fan_in = (out/groups) * kh * kw
    w = np.asarray(params["w"])
    assert w.shape == (3, 3, 6, 4)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_conv_transpose2d_is_adjoint_of_conv2d():
    """<conv(x), y> == <x, conv_transpose(y)> with the same kernel (stride 2, padding 1)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 2, 5))  # conv2d: (kh, kw, in=2, out=5)
    x = rng.normal(size=(1, 8, 8, 2))
    conv = nn.conv2d(5, 3, stride=2, padding=1, use_bias=False)
    y_shape, _, _ = conv.init(jax.random.key(0), x.shape)
    y = rng.normal(size=y_shape)
    tconv = nn.conv_transpose2d(2, 3, stride=2, padding=1, output_padding=1, use_bias=False)
    # the transpose layer's kernel (kh, kw, in=5, out=2) is conv2d's HWIO kernel with I/O swapped
    lhs = np.sum(np.asarray(conv.apply({"w": w}, {}, x)[0]) * y)
    xt, _ = tconv.apply({"w": w.transpose(0, 1, 3, 2)}, {}, jnp.asarray(y))
    assert xt.shape == x.shape
    np.testing.assert_allclose(lhs, np.sum(np.asarray(xt) * x), rtol=1e-10)


# ----------------------------------------------------------------------------- gradients


def check_layer_gradients_jit(layer, x, *, seed=0, order=1):
    """``fdl.testing.check_layer_gradients`` with the apply function jitted (2-4x faster here:
    eager mode compiles every primitive of the JVP/VJP separately)."""
    _, params, state = layer.init(jax.random.key(seed), tuple(x.shape))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    f = jax.jit(lambda p, xx: layer.apply(p, state, xx)[0])
    ft.check_gradients(f, (params, jnp.asarray(x, jnp.float64)), order=order)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: nn.conv2d(4, 3, stride=2, padding=1, groups=2), (1, 5, 5, 2)),
        # depthwise (groups == in_channels), dilated, "same" with an even kernel
        (lambda: nn.conv2d(4, (2, 3), dilation=(1, 2), groups=2, padding="same"), (1, 4, 5, 2)),
        (lambda: nn.conv1d(3, 3, stride=2, padding=(1, 0)), (2, 7, 2)),
        (lambda: nn.conv_transpose2d(4, 3, stride=2, padding=1, output_padding=1, groups=2),
         (1, 3, 3, 2)),
    ],
)
@settings(max_examples=2)
@given(seed=st.integers(0, 2**16))
def test_conv_gradients(layer, shape, seed):
    """Order 1 suffices: a convolution is bilinear in (params, x)."""
    x = np.random.default_rng(seed).normal(size=shape)
    check_layer_gradients_jit(layer(), x)


def test_conv_gradients_dense_check_small():
    """A layer small enough for fdl.testing's coordinate-wise finite-difference comparison."""
    x = np.random.default_rng(0).normal(size=(1, 3, 3, 1))
    layer = nn.conv2d(2, 2, stride=1, padding=((0, 1), (1, 0)))
    ft.check_layer_gradients(layer, x, key=jax.random.key(1), wrt=("x",))
    ft.check_layer_gradients(layer, x, key=jax.random.key(2), wrt=("params",))


# ----------------------------------------------------------------------------- bad input


def test_conv2d_bad_rank_at_init_and_apply():
    layer = nn.conv2d(4, 3)
    with pytest.raises(ShapeError, match=r"conv2d.*rank 4.*got shape \(2, 8, 3\)"):
        layer.init(jax.random.key(0), (2, 8, 3))
    _, params, _ = layer.init(jax.random.key(0), (2, 8, 8, 3))
    with pytest.raises(ShapeError, match=r"rank 4"):
        layer.apply(params, {}, jnp.ones((8, 8, 3)))


def test_conv2d_wrong_channels_at_apply():
    layer = nn.conv2d(4, 3)
    _, params, _ = layer.init(jax.random.key(0), (2, 8, 8, 3))
    with pytest.raises(ShapeError, match=r"expected 3 input channels.*\(2, 8, 8, 5\)"):
        layer.apply(params, {}, jnp.ones((2, 8, 8, 5)))
    # also inside jit (the check is at trace time)
    with pytest.raises(ShapeError, match="expected 3 input channels"):
        jax.jit(lambda x: layer.apply(params, {}, x))(jnp.ones((2, 8, 8, 5)))


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"conv2d: groups=3 must divide out_channels=4"):
        nn.conv2d(4, 3, groups=3)
    with pytest.raises(ShapeError, match=r"conv2d.*groups=2 must divide in_channels=3"):
        nn.conv2d(4, 3, groups=2).init(jax.random.key(0), (1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"conv1d: groups=4 must divide out_channels=6"):
        nn.conv1d(6, 3, groups=4)
    with pytest.raises(ShapeError, match=r"conv_transpose2d.*groups=2 must divide in_channels=5"):
        nn.conv_transpose2d(4, 3, groups=2).init(jax.random.key(0), (1, 4, 4, 5))


def test_output_size_zero_fails_at_init_with_path():
    net = nn.serial(("features", nn.serial(("c1", nn.conv2d(4, 5)), ("c2", nn.conv2d(4, 5)))))
    with pytest.raises(ShapeError) as e:
        net.init(jax.random.key(0), (1, 8, 8, 1))
    msg = str(e.value)
    assert "features/c2" in msg and "conv2d" in msg and "would be <= 0" in msg
    assert "input height 4" in msg
    with pytest.raises(ShapeError, match="would be <= 0"):
        nn.conv2d(2, 3, dilation=4).init(jax.random.key(0), (1, 8, 20, 1))
    with pytest.raises(ShapeError, match="would be <= 0"):
        nn.conv1d(2, 4).init(jax.random.key(0), (1, 3, 1))
    with pytest.raises(ShapeError, match="would be <= 0"):
        nn.conv_transpose2d(2, 1, padding=1).init(jax.random.key(0), (1, 1, 1, 1))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.conv2d(0, 3), r"conv2d: out_channels must be an integer >= 1, got 0"),
        (lambda: nn.conv2d(-2, 3), r"out_channels must be an integer >= 1, got -2"),
        (lambda: nn.conv2d(4, -1), r"kernel_size must be an integer >= 1, got -1"),
        (lambda: nn.conv2d(4, (3, 0)), r"kernel_size must be an integer >= 1, got 0"),
        (lambda: nn.conv2d(4, 3, stride=0), r"stride must be an integer >= 1, got 0"),
        (lambda: nn.conv2d(4, 3, dilation=0), r"dilation must be an integer >= 1"),
        (lambda: nn.conv2d(4, 3, groups=0), r"groups must be an integer >= 1"),
        (lambda: nn.conv2d(4, 3, padding=-1), r"padding must be >= 0"),
        (lambda: nn.conv2d(4, 3, padding="full"), r"'same' or 'valid'"),
        (lambda: nn.conv2d(4, 3, padding=(1, 2, 3)), r"padding must be an int"),
        (lambda: nn.conv1d(4, 3, padding=(1, 2, 3)), r"conv1d: padding must be an int"),
        (lambda: nn.conv1d(0, 3), r"conv1d: out_channels must be an integer >= 1"),
        (lambda: nn.conv_transpose2d(4, 3, stride=2, output_padding=2),
         r"output_padding must be smaller than stride or dilation"),
        (lambda: nn.conv_transpose2d(4, 3, padding=-1), r"padding must be an integer >= 0"),
        (lambda: nn.conv_transpose2d(4, 0), r"kernel_size must be an integer >= 1"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_conv1d_bad_rank():
    layer = nn.conv1d(4, 3)
    with pytest.raises(ShapeError, match=r"conv1d.*rank 3 \(N, L, C\)"):
        layer.init(jax.random.key(0), (1, 8, 8, 3))
    _, params, _ = layer.init(jax.random.key(0), (1, 8, 3))
    with pytest.raises(ShapeError, match=r"expected 3 input channels"):
        layer.apply(params, {}, jnp.ones((1, 8, 2)))
