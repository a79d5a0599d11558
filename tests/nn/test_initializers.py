"""Initializers: shapes, dtypes, fans, empirical moments and bounds against the formulas,
orthogonality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.nn import initializers as I

DENSE = (512, 256)
CONV = (3, 3, 64, 32)  # HWIO


def _fans(shape):
    """Independent fan formula: HWIO / (in, out) layouts."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _sample(init, shape, seed=0, dtype=jnp.float32):
    return np.asarray(init(jax.random.key(seed), shape, dtype), np.float64)


@pytest.mark.parametrize("shape", [DENSE, CONV])
def test_fans_match_torch(shape):
    torch = pytest.importorskip("torch")
    assert I.fans(shape) == _fans(shape)
    # torch's conv weight is (out, in, kh, kw); its fans must agree with ours on HWIO
    t = torch.empty(*(shape[::-1] if len(shape) == 2 else (shape[3], shape[2], *shape[:2])))
    assert I.fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(t)
    assert I.fans(()) == (1, 1) and I.fans((7,)) == (7, 7)


@pytest.mark.parametrize(
    "init",
    [I.zeros, I.ones, I.constant(3.0), I.normal(0.5), I.uniform(0.1), I.xavier_uniform(),
     I.xavier_normal(), I.kaiming_uniform(), I.kaiming_normal(), I.orthogonal()],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shapes_and_dtypes(init, dtype):
    """Shapes and dtypes by abstract evaluation (values are tested below)."""
    for shape in [(4, 3), (2, 2, 3, 5)]:
        a = jax.eval_shape(lambda k, shape=shape: init(k, shape, dtype), jax.random.key(0))
        assert a.shape == shape and a.dtype == dtype
    b = jax.eval_shape(lambda k: init(k, (4, 3)), jax.random.key(0))
    assert b.dtype == jnp.float32  # default dtype


def test_constants():
    assert np.all(_sample(I.zeros, (3, 4)) == 0)
    assert np.all(_sample(I.ones, (3, 4)) == 1)
    assert np.all(_sample(I.constant(-0.25), (5,)) == -0.25)


def test_normal_and_uniform_moments():
    a = _sample(I.normal(0.01), (400, 250))
    assert abs(a.mean()) < 1e-4 and a.std() == pytest.approx(0.01, rel=0.02)
    a = _sample(I.normal(2.0, mean=1.0), (400, 250), seed=1)
    assert a.mean() == pytest.approx(1.0, abs=0.02) and a.std() == pytest.approx(2.0, rel=0.02)
    a = _sample(I.uniform(), (400, 250), seed=2)  # Gluon's U(-0.07, 0.07)
    assert a.min() >= -0.07 and a.max() <= 0.07 and a.max() > 0.0699
    assert a.var() == pytest.approx(0.07**2 / 3, rel=0.02)


@pytest.mark.parametrize("shape", [DENSE, CONV])
def test_xavier(shape):
    fi, fo = _fans(shape)
    bound = math.sqrt(6 / (fi + fo))
    a = _sample(I.xavier_uniform(), shape, 3)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert a.var() == pytest.approx(bound**2 / 3, rel=0.03)
    a = _sample(I.xavier_normal(gain=2.0), shape, 4)
    assert a.var() == pytest.approx(4 * 2 / (fi + fo), rel=0.03)
    assert I.glorot_uniform is I.xavier_uniform and I.glorot_normal is I.xavier_normal


@pytest.mark.parametrize("shape", [DENSE, CONV])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
def test_kaiming(shape, mode):
    fi, fo = _fans(shape)
    fan = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]
    bound = math.sqrt(2) * math.sqrt(3 / fan)  # default gain sqrt(2) (ReLU), as PyTorch
    a = _sample(I.kaiming_uniform(mode), shape, 5)
    assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > 0.99 * bound
    assert a.var() == pytest.approx(2 / fan, rel=0.03)
    a = _sample(I.kaiming_normal(mode, gain=1.0), shape, 6)
    assert a.var() == pytest.approx(1 / fan, rel=0.03)
    assert I.he_uniform is I.kaiming_uniform and I.he_normal is I.kaiming_normal


def test_pytorch_linear_default_bound():
    """kaiming_uniform(gain=1/sqrt(3)) is PyTorch's nn.Linear/Conv default U(+-1/sqrt(fan_in))."""
    a = _sample(I.kaiming_uniform("fan_in", gain=1 / math.sqrt(3)), CONV, 7)
    bound = 1 / math.sqrt(_fans(CONV)[0])
    assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > 0.99 * bound


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 3, 4, 8), (16, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_orthogonal(shape, dtype):
    q = _sample(I.orthogonal(gain=1.5), shape, 8, dtype).reshape(-1, shape[-1])
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    rows, cols = q.shape
    gram = q.T @ q if rows >= cols else q @ q.T
    np.testing.assert_allclose(gram, 1.5**2 * np.eye(min(rows, cols)), atol=tol * 10)
    q2 = _sample(I.orthogonal(), shape, 9, dtype).reshape(-1, shape[-1])
    assert not np.allclose(q2, q / 1.5)  # a different key gives a different matrix
    with pytest.raises(ValueError, match="orthogonal: needs a shape of rank >= 2"):
        I.orthogonal()(jax.random.key(0), (5,))


def test_orthogonal_is_not_biased_to_positive_diagonal_sign_errors():
    """Sign-corrected QR gives a Haar-distributed matrix: the mean entry is ~0."""
    qs = np.stack([_sample(I.orthogonal(), (4, 4), s) for s in range(100)])
    assert np.abs(qs.mean(0)).max() < 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="normal: stddev must be >= 0"):
        I.normal(-1.0)
    with pytest.raises(ValueError, match="uniform: scale must be >= 0"):
        I.uniform(-0.1)
    for f in (I.kaiming_uniform, I.kaiming_normal):
        with pytest.raises(ValueError, match="mode must be 'fan_in', 'fan_out' or 'fan_avg'"):
            f("fan_sum")


def test_user_callable_initializer_in_layers():
    from fdl import nn

    calls = []

    def my_init(key, shape, dtype=jnp.float32):
        calls.append(tuple(shape))
        return jnp.full(shape, 0.5, dtype)

    _, p, _ = nn.dense(3, w_init=my_init, b_init=my_init).init(jax.random.key(0), (1, 2))
    _, pc, _ = nn.conv2d(4, 3, w_init=my_init).init(jax.random.key(1), (1, 5, 5, 2))
    assert calls == [(2, 3), (3,), (3, 3, 2, 4)]
    assert np.all(np.asarray(p["w"]) == 0.5) and np.all(np.asarray(pc["w"]) == 0.5)
