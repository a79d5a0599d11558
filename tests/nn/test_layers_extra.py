"""The layers PyTorch/Flax users expect beyond the book's: conv3d, 3-D and global max pools,
group/instance/RMS norm, upsample. Each: init/apply shape agreement, equality with PyTorch in
float64 (1e-10), float64 gradient checks (hypothesis), bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl import nn
from fdl.nn import ShapeError

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _rand(shape, seed=0, loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def _cf(x):  # channels last -> channels first (torch)
    x = torch.tensor(np.asarray(x, np.float64))
    return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))


def _cl(t):  # channels first -> channels last
    return t.permute(0, *range(2, t.ndim), 1).detach().numpy()


def _run(layer, x, seed=0, train=False):
    out_shape, params, state = layer.init(jax.random.key(seed), tuple(np.shape(x)))
    y, _ = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=train))(params, state,
                                                                       jnp.asarray(x))
    assert tuple(y.shape) == tuple(out_shape)
    return params, np.asarray(y)


# ----------------------------------------------------------------------------- conv3d


@pytest.mark.parametrize("k, stride, padding, groups, dilation", [
    (3, 1, "same", 2, 2),
    ((1, 2, 3), (2, 1, 1), (1, 0, 1), 1, 1),
    (2, 2, "valid", 2, 1),
])
def test_conv3d_equals_torch(k, stride, padding, groups, dilation):
    seed = 3
    x = _rand((2, 6, 5, 7, 4), seed)
    layer = nn.conv3d(6, k, stride=stride, padding=padding, groups=groups, dilation=dilation)
    params, y = _run(layer, x, seed)
    w = torch.tensor(np.asarray(params["w"], np.float64)).permute(4, 3, 0, 1, 2)
    tpad = padding if padding in ("same", "valid") else padding
    ref = F.conv3d(_cf(x), w, torch.tensor(np.asarray(params["b"], np.float64)),
                   stride=stride, padding=tpad, dilation=dilation, groups=groups)
    np.testing.assert_allclose(y, _cl(ref), rtol=1e-10, atol=1e-10)


def test_conv3d_shapes_and_errors():
    out, params, _ = nn.conv3d(8, 3, stride=2, padding=1).init(jax.random.key(0), (1, 9, 8, 7, 3))
    assert out == (1, 5, 4, 4, 8) and params["w"].shape == (3, 3, 3, 3, 8)
    with pytest.raises(ShapeError, match=r"conv3d.*rank 5 \(N, D, H, W, C\)"):
        nn.conv3d(2, 3).init(jax.random.key(0), (1, 8, 8, 3))
    with pytest.raises(ShapeError, match="depth size would be <= 0"):
        nn.conv3d(2, 3).init(jax.random.key(0), (1, 2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(pd, ph, pw\)"):
        nn.conv3d(2, 3, padding=(1, 1))


# ----------------------------------------------------------------------------- pooling


@settings(max_examples=4)
@given(kind=st.sampled_from(["max", "avg"]), k=st.sampled_from([2, 3, (1, 2, 2)]),
       stride=st.sampled_from([None, 1, 2]), pad=st.booleans(), cip=st.booleans(),
       seed=st.integers(0, 99))
def test_pool3d_equals_torch(kind, k, stride, pad, cip, seed):
    ks = (k,) * 3 if isinstance(k, int) else k
    padding = tuple(kk // 2 for kk in ks) if pad else 0
    x = _rand((2, 5, 6, 7, 3), seed)
    if kind == "max":
        layer = nn.max_pool3d(k, stride, padding)
        ref = F.max_pool3d(_cf(x), k, stride, padding)
    else:
        layer = nn.avg_pool3d(k, stride, padding, count_include_pad=cip)
        ref = F.avg_pool3d(_cf(x), k, stride, padding, count_include_pad=cip)
    _, y = _run(layer, x)
    np.testing.assert_allclose(y, _cl(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size, k, s, pad", [(12, 3, 2, 0), (14, 2, 2, 0), (9, 3, 2, 1),
                                           (10, 3, 3, 1), (8, 2, 2, 0)])
def test_max_pool2d_ceil_mode_equals_torch(size, k, s, pad):
    x = _rand((1, size, size + 1, 2), size)
    _, y = _run(nn.max_pool2d(k, s, pad, ceil_mode=True), x)
    ref = F.max_pool2d(_cf(x), k, s, pad, ceil_mode=True)
    np.testing.assert_array_equal(y, _cl(ref))


@pytest.mark.parametrize("nsp", [1, 2, 3])
def test_global_pools_equal_torch(nsp):
    x = _rand((2, *(4, 5, 3)[:nsp], 6), 1)
    adaptive_max = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d,
                    3: F.adaptive_max_pool3d}[nsp]
    adaptive_avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d,
                    3: F.adaptive_avg_pool3d}[nsp]
    for layer, ref in ((getattr(nn, f"global_max_pool{nsp}d")(), adaptive_max),
                       (getattr(nn, f"global_avg_pool{nsp}d")(), adaptive_avg)):
        _, y = _run(layer, x)
        assert y.shape == (2, 6)
        np.testing.assert_allclose(y, ref(_cf(x), 1).reshape(2, 6).numpy(), rtol=1e-12)
    with pytest.raises(ShapeError, match=f"global_max_pool{nsp}d.*rank {nsp + 2}"):
        getattr(nn, f"global_max_pool{nsp}d")().init(jax.random.key(0), (2, 3))


# ----------------------------------------------------------------------------- norms


@settings(max_examples=4)
@given(groups=st.sampled_from([1, 2, 3, 6]), spatial=st.sampled_from([(), (5,), (3, 4),
                                                                      (2, 3, 2)]),
       seed=st.integers(0, 99))
def test_group_norm_equals_torch(groups, spatial, seed):
    x = _rand((3, *spatial, 6), seed, loc=2.0, scale=3.0)
    layer = nn.group_norm(groups, eps=1e-4)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    rng = np.random.default_rng(seed + 1)
    params = {"scale": jnp.asarray(rng.normal(size=6)), "offset": jnp.asarray(rng.normal(size=6))}
    for train in (False, True):
        y, s = layer.apply(params, state, jnp.asarray(x), train=train)
        assert s == {}
        ref = F.group_norm(_cf(x), groups, torch.tensor(np.asarray(params["scale"])),
                           torch.tensor(np.asarray(params["offset"])), eps=1e-4)
        np.testing.assert_allclose(np.asarray(y), _cl(ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 2)])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_equals_torch(spatial, affine):
    x = _rand((2, *spatial, 4), 3, loc=-1.0, scale=2.0)
    layer = nn.instance_norm(use_scale=affine, use_offset=affine)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    assert (params == {}) == (not affine)
    if affine:
        params = {"scale": jnp.asarray(_rand(4, 5)), "offset": jnp.asarray(_rand(4, 6))}
    mod = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d,
           3: torch.nn.InstanceNorm3d}[len(spatial)](4, affine=affine).double()
    if affine:
        with torch.no_grad():
            mod.weight.copy_(torch.tensor(np.asarray(params["scale"])))
            mod.bias.copy_(torch.tensor(np.asarray(params["offset"])))
    y, _ = layer.apply(params, state, jnp.asarray(x), train=True)
    np.testing.assert_allclose(np.asarray(y), _cl(mod(_cf(x))), rtol=1e-10, atol=1e-10)
    with pytest.raises(ShapeError, match="more than one spatial position"):
        layer.init(jax.random.key(0), (2, 1, 1, 4))
    with pytest.raises(ShapeError, match=r"instance_norm.*rank >= 3"):
        layer.init(jax.random.key(0), (2, 4))


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rms_norm_equals_torch(eps, dtype):
    x = _rand((2, 3, 8), 7, loc=0.5).astype(dtype)
    layer = nn.rms_norm(eps=eps)
    _, params, state = layer.init(jax.random.key(0), x.shape)
    scale = _rand(8, 8)
    params = {"scale": jnp.asarray(scale, dtype)}
    y, _ = layer.apply(params, state, jnp.asarray(x))
    assert y.dtype == dtype
    mod = torch.nn.RMSNorm(8, eps=eps).to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        mod.weight.copy_(torch.tensor(scale))
    ref = mod(torch.tensor(x)).detach().numpy()
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(np.asarray(y), ref, rtol=tol, atol=tol)


def test_norm_errors():
    with pytest.raises(ShapeError, match="num_groups=4 must divide the 6 channels"):
        nn.group_norm(4).init(jax.random.key(0), (2, 3, 6))
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
        nn.group_norm(0)
    with pytest.raises(ShapeError, match=r"group_norm.*\(N, \.\.\., 6\)"):
        _, p, s = nn.group_norm(2).init(jax.random.key(0), (2, 6))
        nn.group_norm(2).apply(p, s, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="eps must be a real number > 0"):
        nn.rms_norm(eps=0.0)


# ----------------------------------------------------------------------------- upsample

UPSAMPLE_CASES = [
    ("nearest", None, 2, None),
    ("nearest", None, 3, None),
    ("nearest", None, 1.5, None),
    ("nearest", None, None, (7, 4)),
    ("nearest-exact", None, 1.7, None),
    ("nearest-exact", None, None, (9, 5)),
    ("bilinear", False, 2, None),
    ("bilinear", True, 2, None),
    ("bilinear", False, 1.5, None),
    ("bilinear", False, None, (7, 11)),
    ("bilinear", True, None, (7, 11)),
    ("bilinear", False, None, (3, 2)),  # downsampling too
    ("bilinear", True, None, (1, 4)),
]


@pytest.mark.parametrize("method, align, sf, size", UPSAMPLE_CASES)
def test_upsample_2d_equals_torch(method, align, sf, size):
    x = _rand((2, 5, 6, 3), 11)
    layer = nn.upsample(sf, size=size, method=method, align_corners=align)
    _, y = _run(layer, x)
    ref = F.interpolate(_cf(x), scale_factor=sf, size=size, mode=method, align_corners=align)
    np.testing.assert_allclose(y, _cl(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, shape, sf", [("linear", (2, 7, 3), 2.5),
                                               ("nearest", (2, 7, 3), 2),
                                               ("trilinear", (1, 3, 4, 5, 2), 2),
                                               ("nearest", (1, 3, 4, 5, 2), (2, 1, 3))])
@pytest.mark.parametrize("align", [False, True])
def test_upsample_1d_3d_equals_torch(method, shape, sf, align):
    x = _rand(shape, 12)
    a = align if method != "nearest" else None
    _, y = _run(nn.upsample(sf, method=method, align_corners=a), x)
    ref = F.interpolate(_cf(x), scale_factor=sf, mode=method, align_corners=a)
    np.testing.assert_allclose(y, _cl(ref), rtol=1e-12, atol=1e-12)


def test_upsample_float32_and_errors():
    x = _rand((1, 4, 4, 2), 2).astype(np.float32)
    _, y = _run(nn.upsample(2, method="bilinear"), x)
    assert y.dtype == np.float32
    ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear")
    np.testing.assert_allclose(y, _cl(ref), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of scale_factor and size"):
        nn.upsample()
    with pytest.raises(ValueError, match="align_corners is only for linear"):
        nn.upsample(2, align_corners=True)
    with pytest.raises(ValueError, match="method must be one of"):
        nn.upsample(2, method="cubic")
    with pytest.raises(ValueError, match="scale_factor entries must be finite numbers > 0"):
        nn.upsample(0)
    with pytest.raises(ShapeError, match="'bilinear' needs 2 spatial axes"):
        nn.upsample(2, method="bilinear").init(jax.random.key(0), (1, 4, 2))
    with pytest.raises(ShapeError, match="does not fit 2 spatial axes"):
        nn.upsample((2, 2, 2)).init(jax.random.key(0), (1, 4, 4, 2))


# ----------------------------------------------------------------------------- gradients

GRAD_LAYERS = {
    "conv3d": (lambda: nn.conv3d(2, 2, padding=1, stride=(1, 2, 1)), (1, 3, 3, 2, 2), ()),
    "max_pool3d": (lambda: nn.max_pool3d(2, 1), (1, 3, 3, 3, 2), None),
    "avg_pool3d": (lambda: nn.avg_pool3d(3, 2, 1, count_include_pad=False), (1, 4, 3, 3, 2), ()),
    "global_max_pool2d": (lambda: nn.global_max_pool2d(), (2, 3, 3, 2), None),
    "group_norm": (lambda: nn.group_norm(2), (2, 3, 4), ()),
    "instance_norm": (lambda: nn.instance_norm(use_scale=True, use_offset=True), (2, 3, 2, 2),
                      ()),
    "rms_norm": (lambda: nn.rms_norm(eps=0.1), (3, 5), ()),
    "upsample_bilinear": (lambda: nn.upsample(size=(3, 5), method="bilinear"), (1, 2, 3, 2), ()),
    "upsample_nearest": (lambda: nn.upsample(2), (1, 2, 2, 2), ()),
    "silu": (lambda: nn.silu(), (2, 3), ()),
    "mish": (lambda: nn.mish(), (2, 3), ()),
    "hard_swish": (lambda: nn.hard_swish(), (2, 3), (-3.0, 3.0)),
}


@pytest.mark.parametrize("name", sorted(GRAD_LAYERS))
@settings(max_examples=1)
@given(data=st.data())
def test_gradients_float64(name, data):
    _check_layer_gradients(name, data)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GRAD_LAYERS))
@settings(max_examples=10)
@given(data=st.data())
def test_gradients_float64_sweep(name, data):
    _check_layer_gradients(name, data)


def _check_layer_gradients(name, data):
    make, shape, kinks = GRAD_LAYERS[name]
    if kinks is None:  # max pools: distinct values, well separated (no ties, no kinks)
        perm = data.draw(st.permutations(range(int(np.prod(shape)))))
        x = np.asarray(perm, np.float64).reshape(shape) * 0.1
    else:
        x = data.draw(ft.arrays(shape, min_value=-2.0, max_value=2.0, kinks=kinks))
    ft.check_layer_gradients(make(), x, key=jax.random.key(0), order=1, eps=1e-5)
